#include "eval/evaluate.h"

#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/status_macros.h"

namespace kvplan {
namespace {

constexpr const char* kNeedleIntro =
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.";
constexpr const char* kNeedleFiller =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr const char* kNeedleQuestion = " What is the pass key? The pass key is";

int32_t Argmax(const float* values, int n) { return int32_t(std::max_element(values, values + n) - values); }

// First run of digits in text, or -1.
int64_t FirstInteger(const std::string& text) {
  size_t begin = text.find_first_of("0123456789");
  if (begin == std::string::npos) return -1;
  size_t end = text.find_first_not_of("0123456789", begin);
  const std::string digits = text.substr(begin, std::min<size_t>(end - begin, 15));
  return std::stoll(digits);
}

}  // namespace

absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options,
                                                    const ProgressCallback& progress) {
  if (options.window < 2) return absl::InvalidArgumentError("perplexity window must be at least 2 tokens");
  if (options.window > model.capacity())
    return absl::InvalidArgumentError(
        absl::StrCat("perplexity window ", options.window, " exceeds the cache capacity ", model.capacity()));
  const int64_t usable = std::min<int64_t>(tokens.size(), options.max_tokens);
  const int windows = int(usable / options.window);
  if (windows == 0)
    return absl::InvalidArgumentError(absl::StrCat("need at least ", options.window, " tokens, have ", usable));
  const int vocab = model.config().vocab_size;
  double total_nll = 0;
  PerplexityResult result;
  for (int w = 0; w < windows; ++w) {
    model.Reset();
    const std::vector<int32_t> window(tokens.begin() + int64_t(w) * options.window,
                                      tokens.begin() + int64_t(w + 1) * options.window);
    KVPLAN_ASSIGN_OR_RETURN(std::vector<float> logits, model.Forward(SequenceRows(window, 0, 0), LogitRows::kAll));
    for (int t = 0; t + 1 < options.window; ++t) {
      const float* row = logits.data() + int64_t(t) * vocab;
      const float max_logit = *std::max_element(row, row + vocab);
      double sum = 0;
      for (int i = 0; i < vocab; ++i) sum += std::exp(double(row[i] - max_logit));
      total_nll += std::log(sum) + max_logit - row[window[t + 1]];
      ++result.scored_tokens;
    }
    if (progress) progress(w + 1, windows);
  }
  result.windows = windows;
  result.mean_nll = total_nll / result.scored_tokens;
  result.perplexity = std::exp(result.mean_nll);
  return result;
}

std::vector<int32_t> NeedlePrompt(const Tokenizer& tokenizer, int bos_token_id, int context_length, int pass_key,
                                  double depth) {
  const std::string needle =
      absl::StrCat(" The pass key is ", pass_key, ". Remember it. ", pass_key, " is the pass key.");
  auto build = [&](int fillers) {
    const int before = int(std::lround(fillers * depth));
    std::string text = kNeedleIntro;
    for (int i = 0; i < before; ++i) text += kNeedleFiller;
    text += needle;
    for (int i = before; i < fillers; ++i) text += kNeedleFiller;
    text += kNeedleQuestion;
    std::vector<int32_t> ids;
    if (bos_token_id >= 0) ids.push_back(bos_token_id);
    const std::vector<int32_t> body = tokenizer.Encode(text);
    ids.insert(ids.end(), body.begin(), body.end());
    return ids;
  };
  const int filler_tokens = std::max<int>(1, int(tokenizer.Encode(kNeedleFiller).size()));
  const int overhead = int(build(0).size());
  int fillers = std::max(0, (context_length - overhead) / filler_tokens);
  std::vector<int32_t> ids = build(fillers);
  while (int(ids.size()) > context_length && fillers > 0) ids = build(--fillers);
  return ids;
}

std::vector<NeedleTrial> NeedleTrials(const Tokenizer& tokenizer, int bos_token_id, const NeedleOptions& options) {
  std::mt19937_64 generator(options.seed);
  std::uniform_int_distribution<int> key_distribution(10000, 99999);
  std::vector<NeedleTrial> trials;
  for (int context_length : options.context_lengths) {
    for (int trial = 0; trial < options.trials; ++trial) {
      const int pass_key = key_distribution(generator);
      const double depth = options.trials > 1 ? double(trial) / (options.trials - 1) : 0.5;
      trials.push_back(
          {context_length, pass_key,
           NeedlePrompt(tokenizer, bos_token_id, context_length - options.answer_tokens, pass_key, depth)});
    }
  }
  return trials;
}

absl::StatusOr<std::vector<NeedleResult>> EvaluateNeedle(Model& model, const Tokenizer& tokenizer,
                                                         const NeedleOptions& options,
                                                         const ProgressCallback& progress) {
  for (int context_length : options.context_lengths)
    if (context_length > model.capacity())
      return absl::InvalidArgumentError(
          absl::StrCat("needle context ", context_length, " exceeds the cache capacity ", model.capacity()));
  const std::vector<NeedleTrial> trials = NeedleTrials(tokenizer, model.config().bos_token_id, options);
  std::vector<NeedleResult> results;
  for (size_t i = 0; i < trials.size(); ++i) {
    const NeedleTrial& trial = trials[i];
    if (results.empty() || results.back().context_length != trial.context_length)
      results.push_back({.context_length = trial.context_length});
    model.Reset();
    KVPLAN_ASSIGN_OR_RETURN(std::vector<int32_t> answer,
                            GenerateGreedy(model, trial.prompt, options.answer_tokens, -1));
    results.back().correct += FirstInteger(tokenizer.Decode(answer)) == trial.pass_key;
    ++results.back().trials;
    if (progress) progress(int64_t(i) + 1, int64_t(trials.size()));
  }
  return results;
}

absl::StatusOr<std::vector<int32_t>> GenerateGreedy(Model& model, const std::vector<int32_t>& prompt,
                                                    int max_new_tokens, int eos_token_id) {
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  if (int64_t(prompt.size()) + max_new_tokens > model.capacity())
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt.size(), " tokens) + ", max_new_tokens,
                                                   " new tokens exceed the cache capacity ", model.capacity()));
  absl::StatusOr<std::vector<float>> logits = model.Forward(SequenceRows(prompt, 0, 0), LogitRows::kLastPerSequence);
  std::vector<int32_t> generated;
  const int vocab = model.config().vocab_size;
  for (int step = 0; step < max_new_tokens; ++step) {
    if (!logits.ok()) return logits.status();
    const int32_t next = Argmax(logits->data(), vocab);
    generated.push_back(next);
    if (next == eos_token_id || step + 1 == max_new_tokens) break;
    logits = model.Forward(SequenceRows({next}, 0, int(prompt.size() + generated.size()) - 1), LogitRows::kAll);
  }
  return generated;
}

}  // namespace kvplan
