#include "eval/evaluate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/logit_comparison.h"
#include "base/status_macros.h"
#include "base/token_statistics.h"
#include "plans/cache_policy.h"

namespace kvplan {
namespace {

constexpr const char* kNeedleIntro =
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.";
constexpr const char* kNeedleFiller =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr const char* kNeedleQuestion = " What is the pass key? The pass key is";

// First run of digits in text, or -1.
int64_t FirstInteger(const std::string& text) {
  size_t begin = text.find_first_of("0123456789");
  if (begin == std::string::npos) return -1;
  size_t end = text.find_first_not_of("0123456789", begin);
  const std::string digits = text.substr(begin, std::min<size_t>(end - begin, 15));
  return std::stoll(digits);
}

PerplexityResult PerplexityOf(const MeanEstimate& nll, int windows) {
  const double perplexity = std::exp(nll.mean());
  // The standard error of exp(mean NLL), to first order (what llama-perplexity prints as "±").
  return {.perplexity = perplexity,
          .standard_error = perplexity * nll.standard_error(),
          .mean_nll = nll.mean(),
          .scored_tokens = nll.count(),
          .windows = windows};
}

// Scores `model`'s next-token predictions over the windows; with a reference, the reference's too and the
// divergence between them (PerplexityComparison::reference and ::divergence stay empty without one).
absl::StatusOr<PerplexityComparison> ScoreWindows(Model& model, Model* reference, const std::vector<int32_t>& tokens,
                                                  const PerplexityOptions& options, const ProgressCallback& progress) {
  if (options.window < 2) return absl::InvalidArgumentError("perplexity window must be at least 2 tokens");
  for (const Model* scored : {&model, reference})
    if (scored != nullptr && options.window > scored->capacity())
      return absl::InvalidArgumentError(
          absl::StrCat("perplexity window ", options.window, " exceeds the cache capacity ", scored->capacity()));
  const int vocab = model.config().vocab_size;
  if (reference != nullptr && reference->config().vocab_size != vocab)
    return absl::InvalidArgumentError(absl::StrCat("the reference reads a vocabulary of ",
                                                   reference->config().vocab_size, " tokens, the model ", vocab));
  const int64_t usable = std::min<int64_t>(tokens.size(), options.max_tokens);
  const int windows = int(usable / options.window);
  if (windows == 0)
    return absl::InvalidArgumentError(absl::StrCat("need at least ", options.window, " tokens, have ", usable));
  auto window_logits = [](Model& scored, const std::vector<int32_t>& window) {
    scored.Reset();
    return scored.Forward(SequenceRows(window, 0, 0), LogitRows::kAll);
  };
  MeanEstimate nll, reference_nll, kl, top1;
  std::vector<double> kl_values;
  std::vector<RowComparison> scores(options.window - 1);
  for (int w = 0; w < windows; ++w) {
    const std::vector<int32_t> window(tokens.begin() + int64_t(w) * options.window,
                                      tokens.begin() + int64_t(w + 1) * options.window);
    KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> logits, window_logits(model, window));
    if (reference != nullptr) {
      KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> reference_logits, window_logits(*reference, window));
      KVPLAN_ASSIGN_OR_RETURN(
          scores, CompareLogitRows(reference_logits.data(), logits.data(), options.window - 1, vocab,
                                   window.data() + 1, [&](int64_t t) {
                                     return absl::StrCat("token ", t, " of window ", w, " on ", model.device_name());
                                   }));
    } else {
      // Rows in parallel (a log-partition is a pass over the vocabulary); the sums below run in token order.
#pragma omp parallel for schedule(static)
      for (int t = 0; t < options.window - 1; ++t)
        scores[t].nll = NegativeLogLikelihood(LogitRow(logits.data() + int64_t(t) * vocab, vocab), window[t + 1]);
    }
    for (const RowComparison& score : scores) {
      nll.Add(score.nll);
      if (reference == nullptr) continue;
      reference_nll.Add(score.reference_nll);
      kl.Add(score.kl);
      kl_values.push_back(score.kl);
      top1.Add(score.same_top1);
    }
    if (progress) progress(w + 1, windows);
  }
  PerplexityComparison result{.model = PerplexityOf(nll, windows)};
  if (reference != nullptr) {
    result.reference = PerplexityOf(reference_nll, windows);
    result.divergence = {.kl_mean = kl.mean(),
                         .kl_standard_error = kl.standard_error(),
                         .kl_p99 = Quantile(kl_values, 0.99),
                         .kl_max = Quantile(kl_values, 1.0),
                         .top1_agreement = top1.mean(),
                         .top1_standard_error = top1.standard_error()};
  }
  return result;
}

// Whether `model`, from an empty cache, answers the trial with its pass key.
absl::StatusOr<bool> AnswersPassKey(Model& model, const Tokenizer& tokenizer, const NeedleTrial& trial,
                                    int answer_tokens) {
  model.Reset();
  KVPLAN_ASSIGN_OR_RETURN(std::vector<int32_t> answer, GenerateGreedy(model, trial.prompt, answer_tokens, -1));
  return FirstInteger(tokenizer.Decode(answer)) == trial.pass_key;
}

// The needle trials on `model`, each also run on the reference when one is given.
absl::StatusOr<std::vector<NeedleResult>> RunNeedleTrials(Model& model, Model* reference, const Tokenizer& tokenizer,
                                                          const NeedleOptions& options,
                                                          const ProgressCallback& progress) {
  for (const Model* tested : {&model, reference})
    for (int context_length : options.context_lengths)
      if (tested != nullptr && context_length > tested->capacity())
        return absl::InvalidArgumentError(
            absl::StrCat("needle context ", context_length, " exceeds the cache capacity ", tested->capacity()));
  const std::vector<NeedleTrial> trials = NeedleTrials(tokenizer, model.config().bos_token_id, options);
  std::vector<NeedleResult> results;
  for (size_t i = 0; i < trials.size(); ++i) {
    const NeedleTrial& trial = trials[i];
    if (results.empty() || results.back().context_length != trial.context_length)
      results.push_back({.context_length = trial.context_length,
                         .reference_correct = reference ? std::optional<int>(0) : std::nullopt});
    NeedleResult& result = results.back();
    KVPLAN_ASSIGN_OR_RETURN(const bool correct, AnswersPassKey(model, tokenizer, trial, options.answer_tokens));
    result.correct += correct;
    if (reference != nullptr) {
      KVPLAN_ASSIGN_OR_RETURN(const bool reference_correct,
                              AnswersPassKey(*reference, tokenizer, trial, options.answer_tokens));
      *result.reference_correct += reference_correct;
    }
    ++result.trials;
    if (progress) progress(int64_t(i) + 1, int64_t(trials.size()));
  }
  return results;
}

}  // namespace

absl::StatusOr<PerplexityResult> EvaluatePerplexity(Model& model, const std::vector<int32_t>& tokens,
                                                    const PerplexityOptions& options,
                                                    const ProgressCallback& progress) {
  KVPLAN_ASSIGN_OR_RETURN(PerplexityComparison scored, ScoreWindows(model, nullptr, tokens, options, progress));
  return scored.model;
}

absl::StatusOr<PerplexityComparison> ComparePerplexity(Model& model, Model& reference,
                                                       const std::vector<int32_t>& tokens,
                                                       const PerplexityOptions& options,
                                                       const ProgressCallback& progress) {
  return ScoreWindows(model, &reference, tokens, options, progress);
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
  return RunNeedleTrials(model, nullptr, tokenizer, options, progress);
}

absl::StatusOr<EvalReport> Evaluate(Model& model, Model* reference, const Tokenizer& tokenizer,
                                    const std::vector<int32_t>& tokens, const EvalOptions& options,
                                    const StageProgressCallback& progress) {
  const auto start = std::chrono::steady_clock::now();
  auto stage_progress = [&progress](const std::string& stage) -> ProgressCallback {
    if (!progress) return nullptr;
    return [&progress, stage](int64_t done, int64_t total) { progress(stage, done, total); };
  };
  EvalReport report{.device = model.device_name()};
  if (options.perplexity) {
    KVPLAN_ASSIGN_OR_RETURN(PerplexityComparison scored,
                            ScoreWindows(model, reference, tokens, *options.perplexity, stage_progress("perplexity")));
    report.perplexity = scored.model;
    if (reference != nullptr) {
      report.reference_perplexity = scored.reference;
      report.divergence = scored.divergence;
    }
  }
  if (options.needle) {
    KVPLAN_ASSIGN_OR_RETURN(report.needle,
                            RunNeedleTrials(model, reference, tokenizer, *options.needle, stage_progress("needle")));
  }
  const ModelConfig& config = model.config();
  report.cached_positions = model.cached_positions();
  report.kv_bytes = model.kv_cache_bytes();
  report.full_kv_bytes =
      FullCacheBytes(config.num_layers, config.num_kv_heads, config.head_dim, report.cached_positions);
  report.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
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
