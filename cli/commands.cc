#include "cli/commands.h"

#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/progress.h"
#include "runtime/backend.h"
#include "runtime/bench.h"
#include "runtime/evaluate.h"
#include "runtime/tokenizer.h"

namespace kvplan {
namespace {

#define KVPLAN_ASSIGN_OR_RETURN(lhs, expr) \
  auto lhs##_or = (expr);                  \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = std::move(*lhs##_or)

}  // namespace

absl::Status RunGenerate(const GenerateCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(backend, ParseBackend(command.device));
  KVPLAN_ASSIGN_OR_RETURN(loaded, OpenModelDirectory(command.model_dir));
  KVPLAN_ASSIGN_OR_RETURN(tokenizer, Tokenizer::Load(command.model_dir + "/tokenizer.json"));
  std::vector<int32_t> prompt;
  if (loaded.config.bos_token_id >= 0) prompt.push_back(loaded.config.bos_token_id);
  const std::vector<int32_t> body = tokenizer->Encode(command.prompt);
  prompt.insert(prompt.end(), body.begin(), body.end());
  const int capacity = int(prompt.size()) + command.max_new_tokens;
  KVPLAN_ASSIGN_OR_RETURN(model, CreateModel(loaded.config, *loaded.weights,
                                             {.backend = backend, .capacity = capacity, .max_rows = capacity}));
  KVPLAN_ASSIGN_OR_RETURN(generated,
                          GenerateGreedy(*model, prompt, command.max_new_tokens, loaded.config.eos_token_id));
  std::printf("%s%s\n", command.prompt.c_str(), tokenizer->Decode(generated).c_str());
  return absl::OkStatus();
}

absl::Status RunEval(const EvalCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(backend, ParseBackend(command.device));
  KVPLAN_ASSIGN_OR_RETURN(loaded, OpenModelDirectory(command.model_dir));
  KVPLAN_ASSIGN_OR_RETURN(tokenizer, Tokenizer::Load(command.model_dir + "/tokenizer.json"));
  int capacity = command.window;
  for (int length : command.needle_lengths) capacity = std::max(capacity, length);
  KVPLAN_ASSIGN_OR_RETURN(model, CreateModel(loaded.config, *loaded.weights,
                                             {.backend = backend, .capacity = capacity, .max_rows = capacity}));
  std::vector<std::string> json_fields = {absl::StrFormat("\"device\": \"%s\"", model->device_name())};
  std::printf("model %s on %s\n", command.model_dir.c_str(), model->device_name().c_str());
  if (!command.skip_perplexity) {
    KVPLAN_ASSIGN_OR_RETURN(text, ReadTextFile(command.data_path));
    const std::vector<int32_t> tokens =
        TokenizeDocuments(*tokenizer, SplitDocuments(text), loaded.config.bos_token_id, command.max_tokens);
    ProgressBar bar("perplexity");
    KVPLAN_ASSIGN_OR_RETURN(
        perplexity, EvaluatePerplexity(*model, tokens, {.window = command.window, .max_tokens = command.max_tokens},
                                       [&](int64_t done, int64_t total) { bar.Update(done, total); }));
    std::printf("held-out perplexity %.4f over %lld tokens (%d windows of %d)\n", perplexity.perplexity,
                (long long)perplexity.scored_tokens, perplexity.windows, command.window);
    json_fields.push_back(absl::StrFormat("\"perplexity\": %.6f, \"scored_tokens\": %d", perplexity.perplexity,
                                          perplexity.scored_tokens));
  }
  if (!command.needle_prompts_path.empty()) {
    std::ofstream out(command.needle_prompts_path);
    std::vector<std::string> entries;
    for (const NeedleTrial& trial : NeedleTrials(*tokenizer, loaded.config.bos_token_id,
                                                 {.context_lengths = command.needle_lengths,
                                                  .trials = command.needle_trials}))
      entries.push_back(absl::StrFormat("{\"length\": %d, \"key\": %d, \"ids\": [%s]}", trial.context_length,
                                        trial.pass_key, absl::StrJoin(trial.prompt, ",")));
    out << "[" << absl::StrJoin(entries, ",\n") << "]\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", command.needle_prompts_path));
  }
  if (!command.skip_needle) {
    ProgressBar bar("needle");
    KVPLAN_ASSIGN_OR_RETURN(
        needles, EvaluateNeedle(*model, *tokenizer,
                                {.context_lengths = command.needle_lengths, .trials = command.needle_trials},
                                [&](int64_t done, int64_t total) { bar.Update(done, total); }));
    std::vector<std::string> needle_fields;
    for (const NeedleResult& result : needles) {
      std::printf("needle @%d: %d/%d = %.3f\n", result.context_length, result.correct, result.trials,
                  result.accuracy());
      needle_fields.push_back(absl::StrFormat("\"%d\": %.4f", result.context_length, result.accuracy()));
    }
    json_fields.push_back(absl::StrCat("\"needle\": {", absl::StrJoin(needle_fields, ", "), "}"));
  }
  std::printf("KV cache at %d tokens: %lld bytes\n", capacity, (long long)model->kv_cache_bytes(capacity));
  if (!command.json_path.empty()) {
    std::ofstream out(command.json_path);
    out << "{" << absl::StrJoin(json_fields, ", ") << "}\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", command.json_path));
  }
  return absl::OkStatus();
}

absl::Status RunBench(const BenchCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(backend, ParseBackend(command.device));
  if (command.model_dir.empty() == command.model_shape.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --shape");
  KVPLAN_ASSIGN_OR_RETURN(loaded, command.model_dir.empty() ? RandomModel(command.model_shape, 1)
                                                            : OpenModelDirectory(command.model_dir));
  const int max_context = *std::max_element(command.contexts.begin(), command.contexts.end());
  const int capacity = max_context + command.steps + 8;
  KVPLAN_ASSIGN_OR_RETURN(model, CreateModel(loaded.config, *loaded.weights,
                                             {.backend = backend, .num_sequences = command.batch,
                                              .capacity = capacity, .max_rows = command.batch}));
  std::printf("%-12s %8s %6s %12s %10s %12s %10s\n", "device", "context", "batch", "tokens/s", "ms/step",
              "KV bytes", "GB/s");
  for (int context : command.contexts) {
    KVPLAN_ASSIGN_OR_RETURN(result, BenchDecode(*model, {.context = context, .steps = command.steps}));
    std::printf("%-12s %8d %6d %12.1f %10.3f %12lld %10.1f\n", result.device.substr(0, 12).c_str(), result.context,
                result.batch, result.tokens_per_second, result.seconds_per_step * 1e3,
                (long long)result.kv_cache_bytes, result.achieved_gb_per_second);
  }
  return absl::OkStatus();
}

}  // namespace kvplan
