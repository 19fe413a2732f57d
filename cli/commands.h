// The kvplan subcommands as library calls: main() only parses flags into these option structs.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "calibrate/calibrate.h"
#include "serve/server.h"
#include "sweep/sweep.h"

namespace kvplan {

struct GenerateCommand {
  std::string model_dir;
  std::string prompt;
  int max_new_tokens = 64;
  std::string device = "auto";
  std::string plan_path;  // execute this cache plan
  // Run past the model's max_position_embeddings (RoPE-scaled experiments); refused otherwise.
  bool allow_longer_context = false;
};
absl::Status RunGenerate(const GenerateCommand& command);

struct EvalCommand {
  std::string model_dir;
  std::string data_path;
  int window = 2048;
  int64_t max_tokens = 65536;
  std::vector<int> needle_lengths = {512, 1024, 2048};
  int needle_trials = 40;
  bool skip_needle = false;
  bool skip_perplexity = false;
  std::string device = "auto";
  std::string plan_path;
  bool no_reference = false;        // with a plan: skip the full cache's run (no KL divergence or top-1 agreement)
  std::string json_path;            // also write the results here when set
  std::string needle_prompts_path;  // write the needle trials (ids, pass key) as JSON, for cross-checking
  bool allow_longer_context = false;
  bool force = false;  // replace existing output files that kvplan did not write
  bool quiet = false;  // no progress on stderr
};
absl::Status RunEval(const EvalCommand& command);

inline constexpr int kDefaultBenchContext = 4096;
struct BenchCommand {
  std::string model_dir;    // a checkpoint, or
  std::string model_shape;  // a named real shape with random weights
  std::vector<int> contexts;  // empty: kDefaultBenchContext, or less where the model holds fewer positions
  int batch = 1;
  int steps = 32;
  std::string device = "auto";
  std::string plan_path;
  bool cuda_graphs = true;
  double fit_memory_gb = 0;  // > 0: the largest batch whose device memory fits this many GB (replaces --batch)
  bool allow_longer_context = false;
  int repetitions = 3;  // timed runs per context: the median and the extremes are reported
  bool prefill = true;  // also time the prefill of a prompt of each context length (not with fit_memory_gb)
  bool json = false;    // print the results as one line of JSON instead of a table
};
absl::Status RunBench(const BenchCommand& command);

struct CalibrateCommand {
  CalibrateOptions options;
  // At least one of CalibrationMethodNames(); RunCalibrate parses them into options.methods.
  std::vector<std::string> methods = {"share", "dict", "budget", "refresh"};
  std::string scoring = "l2";           // l2 | attention
  std::string key_coding = "pre-rope";  // pre-rope | post-rope
  bool no_merge = false;
  std::string device = "auto";
  std::string output_path;
  bool require_target = false;  // fail, writing no plan, when the plan misses the memory target
  bool allow_longer_context = false;
  bool force = false;
  bool quiet = false;  // no progress on stderr
};
absl::Status RunCalibrate(CalibrateCommand command);

struct SweepCommand {
  SweepOptions options;
  std::vector<int> needle_lengths;  // empty: the perplexity window
  std::string device = "auto";
  std::string output_path;  // the CSV table
  std::string svg_path;     // the plot, when set
  bool allow_longer_context = false;
  bool force = false;
  bool quiet = false;
};
absl::Status RunSweep(SweepCommand command);

struct InspectCommand {
  std::string plan_path;
  std::vector<int> contexts;  // memory rows; empty: the plan's recorded estimates
  bool json = false;
  bool include_atoms = false;
};
absl::Status RunInspect(const InspectCommand& command);

struct ValidateCommand {
  std::string model_dir;
  std::string plan_path;
};
absl::Status RunValidate(const ValidateCommand& command);

// Serves until interrupted (SIGINT / SIGTERM end it as they end every command).
absl::Status RunServe(const ServeOptions& options);

}  // namespace kvplan
