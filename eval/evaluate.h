// Quality measurements every cache method is judged by: held-out perplexity and pass-key (needle) retrieval.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/tokenizer.h"
#include "runtime/model.h"

namespace kvplan {

// Called with (done, total) as long work advances.
using ProgressCallback = std::function<void(int64_t, int64_t)>;

struct PerplexityOptions {
  int window = 2048;           // tokens per independent window; the first token of each is not scored
  int64_t max_tokens = 65536;  // taken from the start of the token stream
};
struct PerplexityResult {
  double perplexity = 0;
  double mean_nll = 0;
  int64_t scored_tokens = 0;
  int windows = 0;
};
absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options,
                                                    const ProgressCallback& progress = nullptr);

struct NeedleOptions {
  std::vector<int> context_lengths = {512, 1024, 2048};
  int trials = 40;        // per context length; the pass key's depth is spread evenly over them
  uint64_t seed = 1234;   // pass keys are drawn from this
  int answer_tokens = 8;  // generated after the question
};
struct NeedleResult {
  int context_length = 0;
  int correct = 0;
  int trials = 0;
  double accuracy() const { return trials ? double(correct) / trials : 0.0; }
};
// The prompt (as token ids, BOS first) of one pass-key trial with the key at `depth` in [0, 1].
std::vector<int32_t> NeedlePrompt(const Tokenizer& tokenizer, int bos_token_id, int context_length, int pass_key,
                                  double depth);
struct NeedleTrial {
  int context_length = 0;
  int pass_key = 0;
  std::vector<int32_t> prompt;  // BOS first, ends with "The pass key is"
};
// The trials EvaluateNeedle runs, in order; deterministic in options.seed.
std::vector<NeedleTrial> NeedleTrials(const Tokenizer& tokenizer, int bos_token_id, const NeedleOptions& options);

absl::StatusOr<std::vector<NeedleResult>> EvaluateNeedle(Model& model, const Tokenizer& tokenizer,
                                                         const NeedleOptions& options,
                                                         const ProgressCallback& progress = nullptr);

// Greedy decoding of sequence 0 after `prompt`, stopping after max_new_tokens or at eos_token_id (>= 0).
absl::StatusOr<std::vector<int32_t>> GenerateGreedy(Model& model, const std::vector<int32_t>& prompt,
                                                    int max_new_tokens, int eos_token_id);

}  // namespace kvplan
