#include "cli/commands.h"

#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/atomic_file.h"
#include "base/status_macros.h"
#include "cli/command_files.h"
#include "cli/interruption.h"
#include "cli/progress.h"
#include "eval/bench.h"
#include "eval/eval_report.h"
#include "eval/evaluate.h"
#include "loader/open_model.h"
#include "loader/tokenizer.h"
#include "planner/planner.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "runtime/cache/plan_policies.h"
#include "sweep/sweep_report.h"

namespace kvplan {
namespace {

// The plan named on the command line, if any; its model check happens when the model is built.
absl::StatusOr<std::optional<plan::Plan>> OptionalPlan(const std::string& path) {
  if (path.empty()) return std::optional<plan::Plan>();
  KVPLAN_ASSIGN_OR_RETURN(plan::Plan plan, ReadPlanFile(path));
  return std::optional<plan::Plan>(std::move(plan));
}

const plan::Plan* PlanPointer(const std::optional<plan::Plan>& plan) { return plan ? &*plan : nullptr; }

// `line` and a newline.
absl::Status WriteTextFile(const std::string& path, const std::string& line) {
  return WriteFileAtomically(path, line + "\n");
}

// A progress bar for each stage a long command reports, started when the stage begins; an interruption names the
// stage, e.g. "calibration stage 'dictionaries'; no plan written".
StageProgressCallback ProgressBarPerStage(std::string command, std::string unwritten, bool quiet) {
  auto bar = std::make_shared<std::unique_ptr<ProgressBar>>();
  auto stage = std::make_shared<std::string>();
  const ProgressOutput output = ProgressOutputFor(quiet);
  return [bar, stage, command, unwritten, output](const std::string& name, int64_t done, int64_t total) {
    if (name != *stage) {
      *stage = name;
      // Named before the bar announces the stage: whoever reacts to the announcement interrupts this stage.
      SetInterruptedActivity(absl::StrCat(command, " stage '", name, "'", unwritten));
      *bar = std::make_unique<ProgressBar>(name, output);
    }
    (*bar)->Update(done, total);
  };
}

// Positions past max_position_embeddings give quietly wrong results unless RoPE is scaled for them.
absl::Status CheckPositions(const ModelConfig& config, int64_t positions, const std::string& what,
                            bool allow_longer_context) {
  if (allow_longer_context || config.max_position_embeddings <= 0 || positions <= config.max_position_embeddings)
    return absl::OkStatus();
  return absl::OutOfRangeError(absl::StrCat(
      what, " needs ", positions, " positions, beyond the model's max_position_embeddings of ",
      config.max_position_embeddings, " (pass --allow-longer-context to run it anyway, e.g. with RoPE scaling)"));
}

CommandFiles FilesOf(const EvalCommand& command) {
  CommandFiles files = {.reads = ModelFiles(command.model_dir)};
  if (!command.skip_perplexity) files.reads.push_back(command.data_path);
  if (!command.plan_path.empty()) files.reads.push_back(command.plan_path);
  if (!command.json_path.empty()) files.writes.push_back({command.json_path, OutputKind::kEvalReport});
  if (!command.needle_prompts_path.empty())
    files.writes.push_back({command.needle_prompts_path, OutputKind::kNeedlePrompts});
  return files;
}

CommandFiles FilesOf(const CalibrateCommand& command) {
  CommandFiles files = {.writes = {{command.output_path, OutputKind::kPlan}}};
  if (!command.options.model_dir.empty()) files.reads = ModelFiles(command.options.model_dir);
  if (!command.options.data_path.empty()) files.reads.push_back(command.options.data_path);
  return files;
}

CommandFiles FilesOf(const SweepCommand& command) {
  const SweepOptions& options = command.options;
  CommandFiles files = {.reads = ModelFiles(options.calibration.model_dir),
                        .writes = {{command.output_path, OutputKind::kSweepTable}}};
  files.reads.push_back(options.calibration.data_path);
  files.reads.push_back(options.eval_data_path);
  if (!command.svg_path.empty()) files.writes.push_back({command.svg_path, OutputKind::kSweepPlot});
  return files;
}

}  // namespace

absl::Status RunGenerate(const GenerateCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModel(command.model_dir));
  const std::vector<int32_t> prompt = loaded.EncodePrompt(command.prompt);
  const int capacity = int(prompt.size()) + command.max_new_tokens;
  KVPLAN_RETURN_IF_ERROR(CheckPositions(
      loaded.config, capacity,
      absl::StrCat("the prompt (", prompt.size(), " tokens) and --max-new-tokens ", command.max_new_tokens),
      command.allow_longer_context));
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  KVPLAN_ASSIGN_OR_RETURN(
      auto model,
      CreateModel(loaded.config, *loaded.weights,
                  {.backend = backend, .capacity = capacity, .max_rows = capacity, .plan = PlanPointer(plan)}));
  SetInterruptedActivity("generation");
  KVPLAN_ASSIGN_OR_RETURN(auto generated,
                          GenerateGreedy(*model, prompt, command.max_new_tokens, loaded.config.eos_token_id));
  std::printf("%s%s\n", command.prompt.c_str(), loaded.tokenizer->Decode(generated).c_str());
  return absl::OkStatus();
}

absl::Status RunEval(const EvalCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  if (command.data_path.empty() && !command.skip_perplexity)
    return absl::InvalidArgumentError("eval needs --data unless --skip-perplexity");
  KVPLAN_RETURN_IF_ERROR(CheckOutputFiles(FilesOf(command), command.force));
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModel(command.model_dir));
  const bool needles = !command.skip_needle || !command.needle_prompts_path.empty();
  if (!command.skip_perplexity)
    KVPLAN_RETURN_IF_ERROR(CheckPositions(loaded.config, command.window, absl::StrCat("--window ", command.window),
                                          command.allow_longer_context));
  for (int length : needles ? command.needle_lengths : std::vector<int>())
    KVPLAN_RETURN_IF_ERROR(
        CheckPositions(loaded.config, length, absl::StrCat("--needle-lengths ", length), command.allow_longer_context));
  const Tokenizer& tokenizer = *loaded.tokenizer;
  int capacity = command.window;
  for (int length : command.needle_lengths) capacity = std::max(capacity, length);
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  const ModelOptions full_cache = {.backend = backend, .capacity = capacity, .max_rows = capacity};
  ModelOptions planned = full_cache;
  planned.plan = PlanPointer(plan);
  KVPLAN_ASSIGN_OR_RETURN(auto model, CreateModel(loaded.config, *loaded.weights, planned));
  std::unique_ptr<Model> reference;
  if (plan && !command.no_reference) {
    KVPLAN_ASSIGN_OR_RETURN(reference, CreateModel(loaded.config, *loaded.weights, full_cache));
  }
  std::printf("model %s on %s%s\n", command.model_dir.c_str(), model->device_name().c_str(),
              reference ? ", compared with the full cache" : "");
  EvalOptions options;
  std::vector<int32_t> tokens;
  if (!command.skip_perplexity) {
    KVPLAN_ASSIGN_OR_RETURN(tokens, loaded.EncodeDataFile(command.data_path, command.max_tokens));
    options.perplexity = PerplexityOptions{.window = command.window, .max_tokens = command.max_tokens};
  }
  const NeedleOptions needle = {.context_lengths = command.needle_lengths, .trials = command.needle_trials};
  if (!command.needle_prompts_path.empty())
    KVPLAN_RETURN_IF_ERROR(WriteTextFile(
        command.needle_prompts_path, NeedleTrialsJson(NeedleTrials(tokenizer, loaded.config.bos_token_id, needle))));
  if (!command.skip_needle) options.needle = needle;
  KVPLAN_ASSIGN_OR_RETURN(
      EvalReport report,
      Evaluate(*model, reference.get(), tokenizer, tokens, options,
               ProgressBarPerStage("eval", command.json_path.empty() ? "" : "; no results written", command.quiet)));
  report.plan_path = command.plan_path;
  std::printf("%s", EvalReportText(report).c_str());
  if (!command.json_path.empty()) KVPLAN_RETURN_IF_ERROR(WriteTextFile(command.json_path, EvalReportJson(report)));
  return absl::OkStatus();
}

absl::Status RunBench(const BenchCommand& command) {
  KVPLAN_ASSIGN_OR_RETURN(auto backend, ParseBackend(command.device));
  if (command.model_dir.empty() == command.model_shape.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --shape");
  if (command.fit_memory_gb > 0 && ResolveBackend(backend) == Backend::kCpu)
    return absl::InvalidArgumentError(
        "--fit-memory sizes a batch to GPU memory and needs the CUDA runtime (--device cuda, on a machine with a GPU)");
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, command.model_dir.empty() ? RandomModel(command.model_shape, 1)
                                                                 : OpenModel(command.model_dir));
  // No --context: 4096, or as much of the model's context as the timed steps leave.
  const std::vector<int> contexts =
      !command.contexts.empty()
          ? command.contexts
          : std::vector<int>{int(std::max<int64_t>(
                1, std::min<int64_t>(kDefaultBenchContext, loaded.config.max_position_embeddings - command.steps)))};
  const int max_context = *std::max_element(contexts.begin(), contexts.end());
  KVPLAN_RETURN_IF_ERROR(CheckPositions(loaded.config, int64_t(max_context) + command.steps,
                                        absl::StrCat("--context ", max_context, " and --steps ", command.steps),
                                        command.allow_longer_context));
  const int capacity = max_context + command.steps + 8;
  KVPLAN_ASSIGN_OR_RETURN(auto plan, OptionalPlan(command.plan_path));
  const int batch = command.fit_memory_gb > 0 ? 1 : command.batch;
  // The prefill goes in passes of the runtime's default row count; a fitted batch leaves room for its own rows only.
  const bool prefill = command.prefill && command.fit_memory_gb <= 0;
  const int prefill_rows = std::min(max_context, ModelOptions().max_rows);
  KVPLAN_ASSIGN_OR_RETURN(auto model, CreateModel(loaded.config, *loaded.weights,
                                                  {.backend = backend,
                                                   .num_sequences = batch,
                                                   .capacity = capacity,
                                                   .max_rows = prefill ? std::max(batch, prefill_rows) : batch,
                                                   .plan = PlanPointer(plan),
                                                   .cuda_graphs = command.cuda_graphs}));
  if (command.fit_memory_gb > 0) {
    KVPLAN_ASSIGN_OR_RETURN(const int fitted, FitBatchToMemory(*model, int64_t(command.fit_memory_gb * 1e9)));
    std::fprintf(command.json ? stderr : stdout, "largest batch within %.1f GB of device memory: %d\n",
                 command.fit_memory_gb, fitted);
  }
  std::vector<BenchResult> results;
  if (!command.json) std::printf("%s", BenchTableHeader().c_str());
  for (int context : contexts) {
    SetInterruptedActivity(absl::StrCat("bench at context ", context));
    KVPLAN_ASSIGN_OR_RETURN(results.emplace_back(), BenchDecode(*model, {.context = context,
                                                                         .steps = command.steps,
                                                                         .repetitions = command.repetitions,
                                                                         .prefill = prefill,
                                                                         .prefill_rows = prefill_rows}));
    if (!command.json) std::printf("%s", BenchTableRow(results.back()).c_str());
  }
  if (command.json) std::printf("%s\n", BenchReportJson(results, command.plan_path, command.steps).c_str());
  return absl::OkStatus();
}

absl::Status RunCalibrate(CalibrateCommand command) {
  if (command.methods.empty())
    return absl::InvalidArgumentError(
        absl::StrCat("--methods names no method (known: ", absl::StrJoin(CalibrationMethodNames(), ", "), ")"));
  KVPLAN_ASSIGN_OR_RETURN(command.options.methods, ParseCalibrationMethods(command.methods));
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
  KVPLAN_ASSIGN_OR_RETURN(command.options.device, ParseBackend(command.device));
  KVPLAN_RETURN_IF_ERROR(CheckOutputFiles(FilesOf(command), command.force));
  const CalibrateOptions& options = command.options;
  if (!options.model_dir.empty() || (!options.model_shape.empty() && options.random_tokens)) {  // forward passes
    KVPLAN_ASSIGN_OR_RETURN(const ModelConfig config, !options.model_dir.empty()
                                                          ? LoadModelConfig(options.model_dir)
                                                          : NamedModelShape(options.model_shape));
    KVPLAN_RETURN_IF_ERROR(CheckPositions(config, options.sequence_length,
                                          absl::StrCat("--sequence-length ", options.sequence_length),
                                          command.allow_longer_context));
  }
  CalibrationReport report;
  KVPLAN_ASSIGN_OR_RETURN(
      auto plan, Calibrate(options, ProgressBarPerStage("calibration", "; no plan written", command.quiet), &report));
  if (const absl::Status target = CheckMemoryTarget(plan); command.require_target && !target.ok())
    return absl::FailedPreconditionError(absl::StrCat(target.message(), "; no plan written (--strict)"));
  KVPLAN_RETURN_IF_ERROR(WritePlanFile(plan, command.output_path));
  SetInterruptedActivity(absl::StrCat("calibrate, after writing ", command.output_path));
  std::printf("%s\nwrote %s\n", DescribePlan(plan).c_str(), command.output_path.c_str());
  if (report.device.empty()) {  // a synthetic plan (--shape): nothing ran
    std::printf("synthetic plan: no calibration ran\n");
    return absl::OkStatus();
  }
  std::printf("calibrated on %s:", report.device.c_str());
  for (const auto& [stage, seconds] : report.stage_seconds) std::printf(" %s %.1f s;", stage.c_str(), seconds);
  if (report.share_candidates > 0)
    std::printf(" %d sharing candidates at %.2f s each;", report.share_candidates, report.seconds_per_share_candidate);
  if (report.peak_device_bytes > 0) std::printf(" peak device memory %.2f GB", report.peak_device_bytes / 1e9);
  std::printf("\n");
  return absl::OkStatus();
}

absl::Status RunSweep(SweepCommand command) {
  SweepOptions& options = command.options;
  KVPLAN_ASSIGN_OR_RETURN(options.calibration.device, ParseBackend(command.device));
  const int context = options.perplexity.window;
  options.needle.context_lengths = command.needle_lengths.empty() ? std::vector<int>{context} : command.needle_lengths;
  KVPLAN_RETURN_IF_ERROR(CheckOutputFiles(FilesOf(command), command.force));
  KVPLAN_ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(options.calibration.model_dir));
  KVPLAN_RETURN_IF_ERROR(
      CheckPositions(config, context, absl::StrCat("--context ", context), command.allow_longer_context));
  for (int length : options.needle.context_lengths)
    KVPLAN_RETURN_IF_ERROR(
        CheckPositions(config, length, absl::StrCat("--needle-lengths ", length), command.allow_longer_context));
  const int sequence_length = options.calibration.sequence_length;
  KVPLAN_RETURN_IF_ERROR(CheckPositions(config, sequence_length, absl::StrCat("--sequence-length ", sequence_length),
                                        command.allow_longer_context));
  std::printf("sweep of %zu methods x %zu targets on %s, each against the full cache at %d tokens\n",
              options.methods.size(), options.targets.size(), options.calibration.model_dir.c_str(), context);
  KVPLAN_ASSIGN_OR_RETURN(const SweepResult result,
                          Sweep(options, ProgressBarPerStage("sweep", "; no results written", command.quiet)));
  std::printf("%s", SweepText(result).c_str());
  KVPLAN_RETURN_IF_ERROR(WriteFileAtomically(command.output_path, SweepCsv(result)));
  SetInterruptedActivity(absl::StrCat("sweep, after writing ", command.output_path));
  std::printf("wrote %s\n", command.output_path.c_str());
  if (!command.svg_path.empty()) {
    KVPLAN_RETURN_IF_ERROR(WriteFileAtomically(command.svg_path, SweepSvg(result)));
    std::printf("wrote %s\n", command.svg_path.c_str());
  }
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
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, OpenModel(command.model_dir));
  KVPLAN_RETURN_IF_ERROR(PoliciesFromPlan(plan, loaded.config, *loaded.weights).status());
  std::printf("%s: valid for %s\n", command.plan_path.c_str(), command.model_dir.c_str());
  return absl::OkStatus();
}

absl::Status RunServe(const ServeOptions& options) {
  KVPLAN_ASSIGN_OR_RETURN(auto server, Server::Create(options));
  KVPLAN_ASSIGN_OR_RETURN(const int port, server->Bind());
  // A client that leaves mid-response must not end the server: writes to its socket fail instead.
  std::signal(SIGPIPE, SIG_IGN);
  SetInterruptedActivity(absl::StrCat("serving ", server->model_name(), " on ", options.host, ":", port));
  std::fprintf(stderr, "kvplan serve: %s on %s, listening on http://%s:%d\n", server->model_name().c_str(),
               server->device_name().c_str(), options.host.c_str(), port);
  if (const absl::Status chat = server->chat_status(); !chat.ok())
    std::fprintf(stderr, "kvplan serve: chat completions will be refused: %s\n", std::string(chat.message()).c_str());
  return server->Listen();
}

}  // namespace kvplan
