// kvplan: thin CLI11 front end; each subcommand fills an options struct and calls the library.
#include <cstdio>

#include "CLI/CLI.hpp"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "loader/model_config.h"

int main(int argc, char** argv) {
  CLI::App app{"kvplan: KV-cache compression plans for Llama-family models"};
  app.require_subcommand(1);

  kvplan::GenerateCommand generate;
  CLI::App* generate_app = app.add_subcommand("generate", "greedy text generation");
  generate_app->add_option("--model", generate.model_dir, "Hugging Face model directory")->required();
  generate_app->add_option("--prompt", generate.prompt, "prompt text")->required();
  generate_app->add_option("--max-new-tokens", generate.max_new_tokens, "tokens to generate");
  generate_app->add_option("--device", generate.device, "auto | cpu | cuda");
  generate_app->add_option("--plan", generate.plan_path, "execute this cache plan");

  kvplan::EvalCommand eval;
  CLI::App* eval_app = app.add_subcommand(
      "eval", "held-out perplexity and pass-key (needle) accuracy; with --plan, against the full cache too");
  eval_app->add_option("--model", eval.model_dir, "Hugging Face model directory")->required();
  eval_app->add_option("--data", eval.data_path, "held-out text, documents separated by <|doc|> lines");
  eval_app->add_option("--window", eval.window, "perplexity window in tokens");
  eval_app->add_option("--max-tokens", eval.max_tokens, "tokens of the data scored");
  eval_app->add_option("--needle-lengths", eval.needle_lengths, "needle context lengths")->delimiter(',');
  eval_app->add_option("--needle-trials", eval.needle_trials, "needle trials per length");
  eval_app->add_flag("--skip-needle", eval.skip_needle, "only perplexity");
  eval_app->add_flag("--skip-perplexity", eval.skip_perplexity, "only needle");
  eval_app->add_option("--device", eval.device, "auto | cpu | cuda");
  eval_app->add_option("--plan", eval.plan_path, "execute this cache plan");
  eval_app->add_flag("--no-reference", eval.no_reference,
                     "with --plan: skip the full-cache run it is compared with (KL divergence, top-1 agreement)");
  eval_app->add_option("--json", eval.json_path, "also write results as JSON to this file");
  eval_app->add_option("--needle-prompts", eval.needle_prompts_path,
                       "write the needle prompts (token ids, pass key) as JSON, e.g. to replay them in transformers");

  kvplan::BenchCommand bench;
  CLI::App* bench_app = app.add_subcommand("bench", "decode tokens/s and KV bytes at given context lengths");
  bench_app->add_option("--model", bench.model_dir, "Hugging Face model directory");
  bench_app->add_option("--shape", bench.model_shape,
                        "random weights of a real shape: " + absl::StrJoin(kvplan::NamedModelShapes(), ", "));
  bench_app->add_option("--context", bench.contexts, "context lengths")->delimiter(',');
  bench_app->add_option("--batch", bench.batch, "sequences decoded together");
  bench_app->add_option("--steps", bench.steps, "timed decode steps");
  bench_app->add_option("--device", bench.device, "auto | cpu | cuda");
  bench_app->add_option("--plan", bench.plan_path, "execute this cache plan");
  bench_app->add_flag("!--no-cuda-graphs", bench.cuda_graphs, "CUDA: launch every kernel of a decode step eagerly");
  bench_app->add_option("--fit-memory", bench.fit_memory_gb,
                        "CUDA: decode the largest batch whose device memory fits this many GB (instead of --batch)");

  kvplan::CalibrateCommand calibrate;
  kvplan::CalibrateOptions& calibration = calibrate.options;
  CLI::App* calibrate_app = app.add_subcommand("calibrate", "learn a cache plan from sample text");
  calibrate_app->add_option("--model", calibration.model_dir, "Hugging Face model directory");
  calibrate_app->add_option("--shape", calibration.model_shape,
                            "instead of --model: a synthetic plan for random weights of a real shape (runtime speed "
                            "at scale, not quality): " +
                                absl::StrJoin(kvplan::NamedModelShapes(), ", "));
  calibrate_app->add_flag("--random-tokens", calibration.random_tokens,
                          "with --shape: calibrate for real on random token ids (calibration's time and memory at "
                          "scale) instead of a synthetic plan");
  calibrate_app->add_option("--device", calibrate.device,
                            "auto | cpu | cuda: forward passes, sharing search and dictionary training");
  calibrate_app->add_option("--data", calibration.data_path, "calibration text, documents separated by <|doc|> lines");
  calibrate_app->add_option("-o,--output", calibrate.output_path, "plan file to write")->required();
  calibrate_app->add_option("--target-memory", calibration.target_memory_ratio,
                            "plan KV bytes / full-cache bytes at 2K tokens, e.g. 0.2 for 5x");
  calibrate_app->add_option("--reference-context", calibration.reference_context,
                            "the context --target-memory is met at (default: the model's positions, at most 2048)");
  calibrate_app->add_option("--methods", calibrate.methods, "comma-separated: share,dict,budget,refresh");
  calibrate_app->add_option("--sequences", calibration.sequences, "calibration sequences");
  calibrate_app->add_option("--sequence-length", calibration.sequence_length, "tokens per calibration sequence");
  calibrate_app->add_option("--share-threshold", calibration.share_cosine_threshold,
                            "KVSharer: minimum cosine of the last hidden state to the full model");
  calibrate_app->add_option("--max-shared-layers", calibration.max_shared_layers, "KVSharer: at most this many");
  calibrate_app->add_option("--share-sequences", calibration.share_sequences,
                            "KVSharer: calibration sequences each candidate is judged on");
  calibrate_app->add_option("--atoms", calibration.dictionary_atoms, "CSR: dictionary atoms per layer");
  calibrate_app->add_option("--key-sparsity", calibration.key_sparsity, "CSR: atoms per key");
  calibrate_app->add_option("--value-sparsity", calibration.value_sparsity, "CSR: atoms per value");
  calibrate_app->add_option("--coding-window", calibration.coding_recent_window, "CSR: newest tokens left uncoded");
  calibrate_app->add_option("--epochs", calibration.dictionary_epochs, "CSR: dictionary training epochs");
  calibrate_app->add_option("--key-coding", calibrate.key_coding,
                            "CSR: code keys before RoPE (pre-rope, as the paper) or after it (post-rope: faster GPU "
                            "attention)");
  calibrate_app->add_option("--scoring", calibrate.scoring, "budgets: l2 (key norm) | attention");
  calibrate_app->add_flag("--no-merge", calibrate.no_merge, "budgets: drop evicted tokens instead of merging them");
  calibrate_app->add_option("--recent-window", calibration.budget_settings.policy.recent_window,
                            "budgets: never-evicted recent tokens");
  calibrate_app
      ->add_option("--exempt-layers", calibration.budget_settings.exempt_layers,
                   "budgets: layers that keep every token (default 0,1; pass -1 for none)")
      ->delimiter(',');

  kvplan::InspectCommand inspect;
  CLI::App* inspect_app = app.add_subcommand("inspect", "print a plan's decisions and memory per context length");
  inspect_app->add_option("plan", inspect.plan_path, "plan file")->required();
  inspect_app->add_flag("--json", inspect.json, "as JSON");
  inspect_app->add_option("--context", inspect.contexts, "context lengths for the memory table")->delimiter(',');
  inspect_app->add_flag("--atoms", inspect.include_atoms, "with --json: include dictionary atoms");

  kvplan::ValidateCommand validate;
  CLI::App* validate_app = app.add_subcommand("validate", "check a plan against a model");
  validate_app->add_option("--model", validate.model_dir, "Hugging Face model directory")->required();
  validate_app->add_option("plan", validate.plan_path, "plan file")->required();

  CLI11_PARSE(app, argc, argv);

  absl::Status status;
  if (*generate_app) status = kvplan::RunGenerate(generate);
  if (*eval_app) {
    if (eval.data_path.empty() && !eval.skip_perplexity) {
      std::fprintf(stderr, "error: eval needs --data unless --skip-perplexity\n");
      return 2;
    }
    status = kvplan::RunEval(eval);
  }
  if (*bench_app) status = kvplan::RunBench(bench);
  if (*calibrate_app) status = kvplan::RunCalibrate(calibrate);
  if (*inspect_app) status = kvplan::RunInspect(inspect);
  if (*validate_app) status = kvplan::RunValidate(validate);
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
