// Quality measurements every cache method is judged by: held-out perplexity and pass-key (needle) retrieval, and,
// against a reference (the full cache), the divergence of next-token distributions.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
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
  double standard_error = 0;  // of the perplexity: perplexity × the standard error of the mean NLL
  double mean_nll = 0;
  int64_t scored_tokens = 0;
  int windows = 0;
};
absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options,
                                                    const ProgressCallback& progress = nullptr);

// How far a model's next-token distributions are from a reference's on the same tokens, per scored token (what
// llama-perplexity --kl-divergence reports).
struct DivergenceResult {
  double kl_mean = 0;  // KL(reference ‖ model) in nats
  double kl_standard_error = 0;
  double kl_p99 = 0;
  double kl_max = 0;
  double top1_agreement = 0;  // fraction of tokens where both models' most likely next token is the same
  double top1_standard_error = 0;
};
struct PerplexityComparison {
  PerplexityResult model;
  PerplexityResult reference;
  DivergenceResult divergence;
};
// Both models read each window in turn, so only one window's logits per model are held at a time.
absl::StatusOr<PerplexityComparison> ComparePerplexity(Model& model, Model& reference,
                                                       const std::vector<int32_t>& tokens,
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
  std::optional<int> reference_correct;  // the same trials on the reference, when one was run
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

// What `kvplan eval` measures in one run. Reference results come from the full cache of the same runtime, run
// over the same windows and trials, so a plan is judged against kvplan's own full cache under one protocol.
struct EvalOptions {
  std::optional<PerplexityOptions> perplexity;  // unset: no perplexity
  std::optional<NeedleOptions> needle;          // unset: no needle trials
};
struct EvalReport {
  std::string device;
  std::string plan_path;  // the plan file the model executes, as the caller names it; empty: the full cache
  std::optional<PerplexityResult> perplexity;
  std::optional<PerplexityResult> reference_perplexity;
  std::optional<DivergenceResult> divergence;  // from the reference
  std::vector<NeedleResult> needle;
  int64_t cached_positions = 0;  // tokens in the cache as the last window or trial left it
  int64_t kv_bytes = 0;          // the model's cache bytes then
  int64_t full_kv_bytes = 0;     // a full bf16 cache of as many tokens
  double wall_seconds = 0;       // the measurements, model loading excluded
};
// Called with (stage, done, total): stages are "perplexity" and "needle".
using StageProgressCallback = std::function<void(const std::string&, int64_t, int64_t)>;
// `reference` may be null (no comparison); otherwise it must read the same vocabulary as `model`. InvalidArgument
// when a window or needle context exceeds a model's capacity, the tokens fill no window, or the vocabularies
// differ; a model's Forward errors pass through.
absl::StatusOr<EvalReport> Evaluate(Model& model, Model* reference, const Tokenizer& tokenizer,
                                    const std::vector<int32_t>& tokens, const EvalOptions& options,
                                    const StageProgressCallback& progress = nullptr);

// Greedy decoding of sequence 0 after `prompt`, stopping after max_new_tokens or at eos_token_id (>= 0).
absl::StatusOr<std::vector<int32_t>> GenerateGreedy(Model& model, const std::vector<int32_t>& prompt,
                                                    int max_new_tokens, int eos_token_id);

}  // namespace kvplan
