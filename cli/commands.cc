#include "cli/commands.h"

#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "cli/progress.h"
#include "eval/bench.h"
#include "eval/evaluate.h"
#include "loader/documents.h"
#include "loader/tokenizer.h"
#include "planner/planner.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

// The plan named on the command line, if any; its model check happens when the model is built.
absl::StatusOr<std::optional<plan::Plan>> OptionalPlan(const std::string& path) {
  if (path.empty()) return std::optional<plan::Plan>();
  KVPLAN_ASSIGN_OR_RETURN(plan::Plan plan, ReadPlanFile(path));
  return std::optional<plan::Plan>(std::move(plan));
}

const plan::Plan* PlanPointer(const std::optional<plan::Plan>& plan) { return plan ? &*plan : nullptr; }

}  // namespace

absl::Status RunGenerate(const GenerateCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModelDirectory(command.model_dir));
  KVPLAN_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(command.model_dir + "/tokenizer.json"));
  std::vector<int32_t> prompt;
  if (loaded.config.bos_token_id >= 0) prompt.push_back(loaded.config.bos_token_id);
  const std::vector<int32_t> body = tokenizer->Encode(command.prompt);
  prompt.insert(prompt.end(), body.begin(), body.end());
  const int capacity = int(prompt.size()) + command.max_new_tokens;
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  KVPLAN_ASSIGN_OR_RETURN(
      auto model,
      CreateModel(loaded.config, *loaded.weights,
                  {.backend = backend, .capacity = capacity, .max_rows = capacity, .plan = PlanPointer(plan)}));
  KVPLAN_ASSIGN_OR_RETURN(auto generated,
                          GenerateGreedy(*model, prompt, command.max_new_tokens, loaded.config.eos_token_id));
  std::printf("%s%s\n", command.prompt.c_str(), tokenizer->Decode(generated).c_str());
  return absl::OkStatus();
}

absl::Status RunEval(const EvalCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModelDirectory(command.model_dir));
  KVPLAN_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(command.model_dir + "/tokenizer.json"));
  int capacity = command.window;
  for (int length : command.needle_lengths) capacity = std::max(capacity, length);
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  KVPLAN_ASSIGN_OR_RETURN(
      auto model,
      CreateModel(loaded.config, *loaded.weights,
                  {.backend = backend, .capacity = capacity, .max_rows = capacity, .plan = PlanPointer(plan)}));
  std::vector<std::string> json_fields = {absl::StrFormat("\"device\": \"%s\"", model->device_name())};
  std::printf("model %s on %s\n", command.model_dir.c_str(), model->device_name().c_str());
  if (!command.skip_perplexity) {
    KVPLAN_ASSIGN_OR_RETURN(auto text, ReadTextFile(command.data_path));
    const std::vector<int32_t> tokens =
        TokenizeDocuments(*tokenizer, SplitDocuments(text), loaded.config.bos_token_id, command.max_tokens);
    ProgressBar bar("perplexity");
    KVPLAN_ASSIGN_OR_RETURN(
        auto perplexity,
        EvaluatePerplexity(*model, tokens, {.window = command.window, .max_tokens = command.max_tokens},
                           [&](int64_t done, int64_t total) { bar.Update(done, total); }));
    std::printf("held-out perplexity %.4f over %lld tokens (%d windows of %d)\n", perplexity.perplexity,
                (long long)perplexity.scored_tokens, perplexity.windows, command.window);
    json_fields.push_back(absl::StrFormat("\"perplexity\": %.6f, \"scored_tokens\": %d", perplexity.perplexity,
                                          perplexity.scored_tokens));
  }
  if (!command.needle_prompts_path.empty()) {
    std::ofstream out(command.needle_prompts_path);
    std::vector<std::string> entries;
    for (const NeedleTrial& trial :
         NeedleTrials(*tokenizer, loaded.config.bos_token_id,
                      {.context_lengths = command.needle_lengths, .trials = command.needle_trials}))
      entries.push_back(absl::StrFormat("{\"length\": %d, \"key\": %d, \"ids\": [%s]}", trial.context_length,
                                        trial.pass_key, absl::StrJoin(trial.prompt, ",")));
    out << "[" << absl::StrJoin(entries, ",\n") << "]\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", command.needle_prompts_path));
  }
  if (!command.skip_needle) {
    ProgressBar bar("needle");
    KVPLAN_ASSIGN_OR_RETURN(
        auto needles,
        EvaluateNeedle(*model, *tokenizer, {.context_lengths = command.needle_lengths, .trials = command.needle_trials},
                       [&](int64_t done, int64_t total) { bar.Update(done, total); }));
    std::vector<std::string> needle_fields;
    for (const NeedleResult& result : needles) {
      std::printf("needle @%d: %d/%d = %.3f\n", result.context_length, result.correct, result.trials,
                  result.accuracy());
      needle_fields.push_back(absl::StrFormat("\"%d\": %.4f", result.context_length, result.accuracy()));
    }
    json_fields.push_back(absl::StrCat("\"needle\": {", absl::StrJoin(needle_fields, ", "), "}"));
  }
  // The cache as the last needle trial (or perplexity window) left it, against a full bf16 cache of the same
  // number of tokens.
  const int64_t full_bytes = FullCacheBytes(loaded.config.num_layers, loaded.config.num_kv_heads,
                                            loaded.config.head_dim, model->cached_positions());
  const int64_t held_bytes = model->kv_cache_bytes();
  std::printf("KV cache at %lld tokens: %lld bytes (full bf16 cache %lld, %.2fx smaller)\n",
              (long long)model->cached_positions(), (long long)held_bytes, (long long)full_bytes,
              double(full_bytes) / std::max<int64_t>(1, held_bytes));
  json_fields.push_back(absl::StrFormat("\"kv_bytes\": %d, \"full_kv_bytes\": %d", held_bytes, full_bytes));
  if (!command.json_path.empty()) {
    std::ofstream out(command.json_path);
    out << "{" << absl::StrJoin(json_fields, ", ") << "}\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", command.json_path));
  }
  return absl::OkStatus();
}

absl::Status RunBench(const BenchCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  if (command.model_dir.empty() == command.model_shape.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --shape");
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, command.model_dir.empty() ? RandomModel(command.model_shape, 1)
                                                                 : OpenModelDirectory(command.model_dir));
  const int max_context = *std::max_element(command.contexts.begin(), command.contexts.end());
  const int capacity = max_context + command.steps + 8;
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  const int batch = command.fit_memory_gb > 0 ? 1 : command.batch;
  KVPLAN_ASSIGN_OR_RETURN(auto model, CreateModel(loaded.config, *loaded.weights,
                                                  {.backend = backend,
                                                   .num_sequences = batch,
                                                   .capacity = capacity,
                                                   .max_rows = batch,
                                                   .plan = PlanPointer(plan),
                                                   .cuda_graphs = command.cuda_graphs}));
  if (command.fit_memory_gb > 0) {
    KVPLAN_ASSIGN_OR_RETURN(const int fitted, FitBatchToMemory(*model, int64_t(command.fit_memory_gb * 1e9)));
    std::printf("largest batch within %.1f GB of device memory: %d\n", command.fit_memory_gb, fitted);
  }
  std::printf("%-12s %8s %6s %12s %10s %12s %10s\n", "device", "context", "batch", "tokens/s", "ms/step", "KV bytes",
              "GB/s");
  for (int context : command.contexts) {
    KVPLAN_ASSIGN_OR_RETURN(auto result, BenchDecode(*model, {.context = context, .steps = command.steps}));
    std::printf("%-12s %8d %6d %12.1f %10.3f %12lld %10.1f\n", result.device.substr(0, 12).c_str(), result.context,
                result.batch, result.tokens_per_second, result.seconds_per_step * 1e3, (long long)result.kv_cache_bytes,
                result.achieved_gb_per_second);
  }
  return absl::OkStatus();
}

absl::Status RunCalibrate(CalibrateCommand command) {
  command.options.methods.clear();
  for (absl::string_view method : absl::StrSplit(command.methods, ',', absl::SkipEmpty()))
    command.options.methods.insert(std::string(method));
  if (command.scoring == "attention") {
    command.options.budget_settings.policy.scoring = plan::TokenBudgets::ATTENTION_SCORE;
  } else if (command.scoring != "l2") {
    return absl::InvalidArgumentError(absl::StrCat("unknown scoring \"", command.scoring, "\" (l2, attention)"));
  }
  command.options.budget_settings.policy.merge_evicted = !command.no_merge;
  if (command.key_coding == "post-rope") {
    command.options.keys_after_rope = true;
  } else if (command.key_coding != "pre-rope") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown key coding \"", command.key_coding, "\" (pre-rope, post-rope)"));
  }
  std::string stage;
  std::unique_ptr<ProgressBar> bar;
  KVPLAN_ASSIGN_OR_RETURN(auto plan,
                          Calibrate(command.options, [&](const std::string& name, int64_t done, int64_t total) {
                            if (name != stage) {
                              stage = name;
                              bar = std::make_unique<ProgressBar>(name);
                            }
                            bar->Update(done, total);
                          }));
  KVPLAN_RETURN_IF_ERROR(WritePlanFile(plan, command.output_path));
  std::printf("%s\nwrote %s\n", DescribePlan(plan).c_str(), command.output_path.c_str());
  return absl::OkStatus();
}

absl::Status RunInspect(const InspectCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto plan, ReadPlanFile(command.plan_path));
  if (command.json) {
    KVPLAN_ASSIGN_OR_RETURN(auto json, PlanToJson(plan, command.include_atoms));
    std::printf("%s\n", json.c_str());
  } else {
    std::printf("%s", DescribePlan(plan, command.contexts).c_str());
  }
  return absl::OkStatus();
}

absl::Status RunValidate(const ValidateCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto plan, ReadPlanFile(command.plan_path));
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModelDirectory(command.model_dir));
  KVPLAN_RETURN_IF_ERROR(PoliciesFromPlan(plan, loaded.config, *loaded.weights).status());
  std::printf("%s: valid for %s\n", command.plan_path.c_str(), command.model_dir.c_str());
  return absl::OkStatus();
}

}  // namespace kvplan
