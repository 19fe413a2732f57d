// kvplan: thin CLI11 front end; each subcommand fills an options struct and calls the library.
#include <cstdio>

#include "CLI/CLI.hpp"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "runtime/model_config.h"

int main(int argc, char** argv) {
  CLI::App app{"kvplan: KV-cache compression plans for Llama-family models"};
  app.require_subcommand(1);

  kvplan::GenerateCommand generate;
  CLI::App* generate_app = app.add_subcommand("generate", "greedy text generation");
  generate_app->add_option("--model", generate.model_dir, "Hugging Face model directory")->required();
  generate_app->add_option("--prompt", generate.prompt, "prompt text")->required();
  generate_app->add_option("--max-new-tokens", generate.max_new_tokens, "tokens to generate");
  generate_app->add_option("--device", generate.device, "auto | cpu | cuda");

  kvplan::EvalCommand eval;
  CLI::App* eval_app = app.add_subcommand("eval", "held-out perplexity and pass-key (needle) accuracy");
  eval_app->add_option("--model", eval.model_dir, "Hugging Face model directory")->required();
  eval_app->add_option("--data", eval.data_path, "held-out text, documents separated by <|doc|> lines");
  eval_app->add_option("--window", eval.window, "perplexity window in tokens");
  eval_app->add_option("--max-tokens", eval.max_tokens, "tokens of the data scored");
  eval_app->add_option("--needle-lengths", eval.needle_lengths, "needle context lengths")->delimiter(',');
  eval_app->add_option("--needle-trials", eval.needle_trials, "needle trials per length");
  eval_app->add_flag("--skip-needle", eval.skip_needle, "only perplexity");
  eval_app->add_flag("--skip-perplexity", eval.skip_perplexity, "only needle");
  eval_app->add_option("--device", eval.device, "auto | cpu | cuda");
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
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
