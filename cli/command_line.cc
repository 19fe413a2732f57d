#include "cli/command_line.h"

#include <functional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/build_info.h"
#include "cli/interruption.h"
#include "loader/model_config.h"
#include "sweep/sweep.h"

namespace kvplan {
namespace {

// CLI11 2.1's PositiveNumber reports "not in range 0.000000 to 1797...": these name the rule instead.
CLI::Validator NumberRule(const std::string& rule, std::function<bool(double)> holds) {
  return CLI::Validator(
      [rule, holds](std::string& text) -> std::string {
        double value = 0;
        if (CLI::detail::lexical_cast(text, value) && holds(value)) return "";
        return "\"" + text + "\" is not " + rule;
      },
      rule);
}
const CLI::Validator kPositive = NumberRule("a positive number", [](double value) { return value > 0; });
const CLI::Validator kNonNegative = NumberRule("a non-negative number", [](double value) { return value >= 0; });
// Checks every item of a comma-separated list (CLI11 splits first): "" and "4096," name no value.
const CLI::Validator kNonEmpty(
    [](std::string& text) -> std::string { return text.empty() ? "an empty value or list item" : ""; }, "NONEMPTY");

template <typename Number>
CLI::Option* AddList(CLI::App* app, const std::string& name, std::vector<Number>& values, const std::string& help) {
  return app->add_option(name, values, help)->delimiter(',')->check(kNonEmpty);
}

void AddCommonRunFlags(CLI::App* app, std::string& model_dir, bool& allow_longer_context) {
  app->add_option("--model", model_dir, "Hugging Face model directory")->check(CLI::ExistingDirectory);
  app->add_flag("--allow-longer-context", allow_longer_context,
                "run past the model's max_position_embeddings (RoPE-scaled experiments)");
}

// How much calibration reads and trains: calibrate's flags, which a sweep passes on to every point.
void AddCalibrationSizeFlags(CLI::App* app, CalibrateOptions& options) {
  app->add_option("--sequences", options.sequences, "calibration sequences")->check(kPositive);
  app->add_option("--sequence-length", options.sequence_length, "tokens per calibration sequence")->check(kPositive);
  app->add_option("--atoms", options.dictionary_atoms, "CSR: dictionary atoms per layer")->check(CLI::Range(1, 65536));
  app->add_option("--epochs", options.dictionary_epochs, "CSR: dictionary training epochs")->check(kPositive);
}

CLI::Option* AddDevice(CLI::App* app, std::string& device, const std::string& help) {
  return app->add_option("--device", device, help)->check(CLI::IsMember({"auto", "cpu", "cuda"}));
}

// Progress bars draw only on a terminal; --quiet silences the stage lines logs and pipes get instead.
void AddQuietFlag(CLI::App* app, bool& quiet) { app->add_flag("-q,--quiet", quiet, "no progress output on stderr"); }

// `kvplan --version`: the version, then the build options that decide what a binary can run.
std::string VersionText() {
  std::string cuda = "CUDA: off";
  if (kBuiltWithCuda) cuda = absl::StrCat("CUDA: on (architectures ", kCudaArchitectures, ")");
  return absl::StrCat("kvplan ", kKvplanVersion, "\n", cuda, "\nbuild: ", kBuildType,
                      kBuiltWithSanitizers ? ", AddressSanitizer + UndefinedBehaviorSanitizer" : "");
}

}  // namespace

CommandLine::CommandLine() {
  app_.require_subcommand(1);
  app_.set_version_flag("--version", VersionText());
  // Every --help shows each option's default; subcommands inherit this from the app.
  app_.option_defaults()->always_capture_default();

  AddGenerateCommand();
  AddEvalCommand();
  AddBenchCommand();
  AddCalibrateCommand();
  AddSweepCommand();
  AddInspectCommands();
  AddServeCommand();
}

void CommandLine::AddGenerateCommand() {
  CLI::App* generate = app_.add_subcommand("generate", "greedy text generation");
  AddCommonRunFlags(generate, generate_.model_dir, generate_.allow_longer_context);
  generate->get_option("--model")->required();
  generate->add_option("--prompt", generate_.prompt, "prompt text")->required();
  generate->add_option("--max-new-tokens", generate_.max_new_tokens, "tokens to generate")->check(kPositive);
  AddDevice(generate, generate_.device, "auto | cpu | cuda");
  generate->add_option("--plan", generate_.plan_path, "execute this cache plan")->check(CLI::ExistingFile);
}

void CommandLine::AddEvalCommand() {
  CLI::App* eval = app_.add_subcommand(
      "eval", "held-out perplexity and pass-key (needle) accuracy; with --plan, against the full cache too");
  AddCommonRunFlags(eval, eval_.model_dir, eval_.allow_longer_context);
  eval->get_option("--model")->required();
  eval->add_option("--data", eval_.data_path, "held-out text, documents separated by <|doc|> lines")
      ->check(CLI::ExistingFile);
  eval->add_option("--window", eval_.window, "perplexity window in tokens")->check(CLI::Range(2, 1 << 30));
  eval->add_option("--max-tokens", eval_.max_tokens, "tokens of the data scored")->check(kPositive);
  AddList(eval, "--needle-lengths", eval_.needle_lengths, "needle context lengths")->check(kPositive);
  eval->add_option("--needle-trials", eval_.needle_trials, "needle trials per length")->check(kPositive);
  eval->add_flag("--skip-needle", eval_.skip_needle, "only perplexity");
  eval->add_flag("--skip-perplexity", eval_.skip_perplexity, "only needle");
  AddDevice(eval, eval_.device, "auto | cpu | cuda");
  eval->add_option("--plan", eval_.plan_path, "execute this cache plan")->check(CLI::ExistingFile);
  eval->add_flag("--no-reference", eval_.no_reference,
                 "with --plan: skip the full-cache run it is compared with (KL divergence, top-1 agreement)");
  eval->add_option("--json", eval_.json_path, "also write results as JSON to this file")->check(kNonEmpty);
  eval->add_option("--needle-prompts", eval_.needle_prompts_path,
                   "write the needle prompts (token ids, pass key) as JSON, e.g. to replay them in transformers")
      ->check(kNonEmpty);
  eval->add_flag("--force", eval_.force, "replace existing output files kvplan did not write");
  AddQuietFlag(eval, eval_.quiet);
}

void CommandLine::AddBenchCommand() {
  CLI::App* bench = app_.add_subcommand(
      "bench", "decode tokens/s (median and range of repetitions), KV bytes and prefill tokens/s per context length");
  AddCommonRunFlags(bench, bench_.model_dir, bench_.allow_longer_context);
  bench
      ->add_option("--shape", bench_.model_shape,
                   "random weights of a real shape: " + absl::StrJoin(NamedModelShapes(), ", "))
      ->check(CLI::IsMember(NamedModelShapes()));
  AddList(bench, "--context", bench_.contexts,
          "context lengths (default: 4096, or the model's positions less --steps where fewer)")->check(kPositive);
  bench->add_option("--batch", bench_.batch, "sequences decoded together")->check(kPositive);
  bench->add_option("--steps", bench_.steps, "timed decode steps per repetition")->check(kPositive);
  bench->add_option("--repetitions", bench_.repetitions, "timed runs per context length")->check(CLI::Range(1, 1000));
  bench->add_flag("!--no-prefill", bench_.prefill,
                  "skip timing the prefill of a prompt of each context length (--fit-memory skips it too)");
  bench->add_flag("--json", bench_.json, "print the results as one line of JSON instead of a table");
  AddDevice(bench, bench_.device, "auto | cpu | cuda");
  bench->add_option("--plan", bench_.plan_path, "execute this cache plan")->check(CLI::ExistingFile);
  bench->add_flag("!--no-cuda-graphs", bench_.cuda_graphs, "CUDA: launch every kernel of a decode step eagerly");
  bench
      ->add_option("--fit-memory", bench_.fit_memory_gb,
                   "CUDA: decode the largest batch whose device memory fits this many GB (instead of --batch)")
      ->check(kPositive);
}

void CommandLine::AddCalibrateCommand() {
  CalibrateOptions& calibration = calibrate_.options;
  CLI::App* calibrate = app_.add_subcommand("calibrate", "learn a cache plan from sample text");
  AddCommonRunFlags(calibrate, calibration.model_dir, calibrate_.allow_longer_context);
  calibrate
      ->add_option("--shape", calibration.model_shape,
                   "instead of --model: a synthetic plan for random weights of a real shape (runtime speed at "
                   "scale, not quality): " +
                       absl::StrJoin(NamedModelShapes(), ", "))
      ->check(CLI::IsMember(NamedModelShapes()));
  calibrate->add_flag("--random-tokens", calibration.random_tokens,
                      "with --shape: calibrate for real on random token ids (calibration's time and memory at "
                      "scale) instead of a synthetic plan");
  AddDevice(calibrate, calibrate_.device, "auto | cpu | cuda: forward passes, sharing search and dictionary training");
  calibrate->add_option("--data", calibration.data_path, "calibration text, documents separated by <|doc|> lines")
      ->check(CLI::ExistingFile);
  calibrate->add_option("-o,--output", calibrate_.output_path, "plan file to write")->required()->check(kNonEmpty);
  calibrate->add_flag("--force", calibrate_.force, "replace an existing file that is not a kvplan plan");
  calibrate->add_flag("--strict,--require-target", calibrate_.require_target,
                      "fail, writing no plan, when the plan misses --target-memory");
  AddQuietFlag(calibrate, calibrate_.quiet);
  calibrate
      ->add_option("--target-memory", calibration.target_memory_ratio,
                   "plan KV bytes / full-cache bytes at 2K tokens, e.g. 0.2 for 5x")
      ->check(kPositive)
      ->check(CLI::Range(0.0, 1.0));
  calibrate
      ->add_option("--reference-context", calibration.reference_context,
                   "the context --target-memory is met at (default: the model's positions, at most 2048)")
      ->check(kPositive);
  calibrate->add_option("--methods", calibrate_.methods, "comma-separated: share,dict,quant,budget,refresh,optimise")
      ->delimiter(',')
      ->check(kNonEmpty)
      ->check(CLI::IsMember(CalibrationMethodNames()));
  AddCalibrationSizeFlags(calibrate, calibration);
  calibrate
      ->add_option("--share-threshold", calibration.share_cosine_threshold,
                   "KVSharer: minimum cosine of the last hidden state to the full model")
      ->check(CLI::Range(-1.0, 1.0));
  calibrate
      ->add_option("--max-shared-layers", calibration.max_shared_layers,
                   "KVSharer: at most this many (-1: a third of the layers)")
      ->check(CLI::Range(-1, 1 << 20));
  calibrate
      ->add_option("--share-sequences", calibration.share_sequences,
                   "KVSharer: calibration sequences each candidate is judged on")
      ->check(kPositive);
  calibrate->add_option("--key-sparsity", calibration.key_sparsity, "CSR: atoms per key")->check(kPositive);
  calibrate->add_option("--value-sparsity", calibration.value_sparsity, "CSR: atoms per value")->check(kPositive);
  calibrate->add_option("--coding-window", calibration.coding_recent_window, "CSR: newest tokens left uncoded")
      ->check(kNonNegative);
  calibrate
      ->add_option("--key-coding", calibrate_.key_coding,
                   "CSR: code keys before RoPE (pre-rope, as the paper) or after it (post-rope: faster GPU "
                   "attention)")
      ->check(CLI::IsMember({"pre-rope", "post-rope"}));
  const auto quantization_width = CLI::IsMember({2, 4, 8});
  calibrate->add_option("--key-bits", calibration.key_bits, "quant: bits per key channel (2, 4, 8)")
      ->check(quantization_width);
  calibrate->add_option("--value-bits", calibration.value_bits, "quant: bits per value channel (2, 4, 8)")
      ->check(quantization_width);
  calibrate->add_option("--quant-window", calibration.quantization_recent_window, "quant: newest tokens kept in bf16")
      ->check(kNonNegative);
  AddList(calibrate, "--optimiser-widths", calibration.optimiser_widths,
          "optimise: quantization widths each layer is measured at (besides bf16)")
      ->check(quantization_width);
  AddList(calibrate, "--optimiser-fractions", calibration.optimiser_keep_fractions,
          "optimise: token budget fractions each layer is measured at (besides 1)")
      ->check(CLI::Range(0.0001, 1.0));
  calibrate
      ->add_option("--optimiser-sequences", calibration.optimiser_sequences,
                   "optimise: calibration sequences the settings are measured on")
      ->check(kPositive);
  calibrate
      ->add_option("--verify-sequences", calibration.verify_sequences,
                   "optimise: held-back calibration sequences the chosen plan is verified on")
      ->check(kPositive);
  calibrate
      ->add_option("--retrieval-probes", calibration.retrieval_probes,
                   "optimise: pass-key probes in calibration text the settings are also measured on (0: none)")
      ->check(kNonNegative);
  calibrate
      ->add_option("--retrieval-weight", calibration.retrieval_weight,
                   "optimise: a setting's loss is its text KL + this * its probe KL")
      ->check(kNonNegative);
  calibrate->add_option("--scoring", calibrate_.scoring, "budgets: l2 (key norm) | attention")
      ->check(CLI::IsMember({"l2", "attention"}));
  calibrate->add_flag("--no-merge", calibrate_.no_merge, "budgets: drop evicted tokens instead of merging them");
  calibrate
      ->add_option("--recent-window", calibration.budget_settings.policy.recent_window,
                   "budgets: never-evicted recent tokens")
      ->check(kNonNegative);
  AddList(calibrate, "--exempt-layers", calibration.budget_settings.exempt_layers,
          "budgets: layers that keep every token (default 0,1; pass -1 for none)")
      ->check(CLI::Range(-1, 1 << 20));
}

void CommandLine::AddSweepCommand() {
  SweepOptions& sweep_options = sweep_.options;
  CalibrateOptions& sweep_calibration = sweep_options.calibration;
  std::vector<std::string> sweep_methods, sweep_method_help;
  for (const SweepMethod& method : SweepMethods()) {
    sweep_methods.push_back(method.name);
    sweep_method_help.push_back(absl::StrCat(method.name, " (", method.description, ")"));
  }
  CLI::App* sweep = app_.add_subcommand(
      "sweep", "calibrate and evaluate every method at every memory target: a CSV table and a plot to choose from");
  AddCommonRunFlags(sweep, sweep_calibration.model_dir, sweep_.allow_longer_context);
  sweep->get_option("--model")->required();
  sweep->add_option("--calibration-data", sweep_calibration.data_path, "calibration text")
      ->required()
      ->check(CLI::ExistingFile);
  sweep->add_option("--eval-data", sweep_options.eval_data_path, "held-out text for perplexity")
      ->required()
      ->check(CLI::ExistingFile);
  sweep
      ->add_option("--methods", sweep_options.methods,
                   "comma-separated presets: " + absl::StrJoin(sweep_method_help, "; "))
      ->delimiter(',')
      ->check(kNonEmpty)
      ->check(CLI::IsMember(sweep_methods));
  sweep->add_option("--targets", sweep_options.targets, "memory targets: plan bytes / full-cache bytes, e.g. 0.5,0.2")
      ->delimiter(',')
      ->check(kNonEmpty)
      ->check(kPositive)
      ->check(CLI::Range(0.0, 1.0));
  sweep->add_option("-o,--output", sweep_.output_path, "CSV table to write")->required()->check(kNonEmpty);
  sweep->add_option("--svg", sweep_.svg_path, "also plot KV reduction against perplexity and needle accuracy here")
      ->check(kNonEmpty);
  AddQuietFlag(sweep, sweep_.quiet);
  sweep->add_flag("--force", sweep_.force, "replace existing output files kvplan did not write");
  AddDevice(sweep, sweep_.device, "auto | cpu | cuda: calibration and evaluation");
  sweep
      ->add_option("--context", sweep_options.perplexity.window,
                   "perplexity window: the context targets are met at and reductions are measured at")
      ->check(CLI::Range(2, 1 << 30));
  sweep->add_option("--max-tokens", sweep_options.perplexity.max_tokens, "tokens of the eval data scored")
      ->check(kPositive);
  AddList(sweep, "--needle-lengths", sweep_.needle_lengths, "needle context lengths (default: --context)")
      ->check(kPositive);
  sweep->add_option("--needle-trials", sweep_options.needle.trials, "needle trials per length, at evenly spread depths")
      ->check(kPositive);
  AddCalibrationSizeFlags(sweep, sweep_calibration);
}

void CommandLine::AddInspectCommands() {
  CLI::App* inspect = app_.add_subcommand("inspect", "print a plan's decisions and memory per context length");
  inspect->add_option("plan", inspect_.plan_path, "plan file")->required()->check(CLI::ExistingFile);
  inspect->add_flag("--json", inspect_.json, "as JSON");
  AddList(inspect, "--context", inspect_.contexts, "context lengths for the memory table")->check(kPositive);
  inspect->add_flag("--atoms", inspect_.include_atoms, "with --json: include dictionary atoms");

  CLI::App* validate = app_.add_subcommand("validate", "check a plan against a model");
  validate->add_option("--model", validate_.model_dir, "Hugging Face model directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  validate->add_option("plan", validate_.plan_path, "plan file")->required()->check(CLI::ExistingFile);
}

void CommandLine::AddServeCommand() {
  CLI::App* serve = app_.add_subcommand(
      "serve", "OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching");
  serve->add_option("--model", serve_.model_dir, "Hugging Face model directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  serve->add_option("--plan", serve_.plan_path, "execute this cache plan")->check(CLI::ExistingFile);
  serve->add_option("--host", serve_.host, "address to listen on");
  serve->add_option("--port", serve_.port, "port to listen on (0: any free port)")->check(CLI::Range(0, 65535));
  AddDevice(serve, serve_.device, "auto | cpu | cuda");
  serve->add_option("--max-batch", serve_.max_batch, "sequences decoded together")->check(kPositive);
  serve
      ->add_option("--kv-memory", serve_.kv_memory_bytes,
                   "bytes of KV cache that running requests may reserve (prompt + max_tokens under the plan); "
                   "default: what --max-batch sequences hold at the full context")
      ->check(kPositive);
  serve->add_option("--max-queue", serve_.max_queue, "requests that may wait for a sequence before 503")
      ->check(kNonNegative);
  serve->add_option("--context", serve_.context, "positions per sequence (default: max_position_embeddings)")
      ->check(kPositive);
  serve->add_option("--model-name", serve_.model_name, "the model id clients use (default: the folder's name)");
}

absl::Status CommandLine::Run() const {
  const std::string name = app_.get_subcommands().front()->get_name();
  SetInterruptedActivity(name);
  if (name == "generate") return RunGenerate(generate_);
  if (name == "eval") return RunEval(eval_);
  if (name == "bench") return RunBench(bench_);
  if (name == "calibrate") return RunCalibrate(calibrate_);
  if (name == "sweep") return RunSweep(sweep_);
  if (name == "inspect") return RunInspect(inspect_);
  if (name == "serve") return RunServe(serve_);
  return RunValidate(validate_);
}

}  // namespace kvplan
