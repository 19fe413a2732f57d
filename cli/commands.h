// The kvplan subcommands as library calls: main() only parses flags into these option structs.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvplan {

struct GenerateCommand {
  std::string model_dir;
  std::string prompt;
  int max_new_tokens = 64;
  std::string device = "auto";
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
  std::string json_path;  // also write the results here when set
  std::string needle_prompts_path;  // write the needle trials (ids, pass key) as JSON, for cross-checking
};
absl::Status RunEval(const EvalCommand& command);

struct BenchCommand {
  std::string model_dir;    // a checkpoint, or
  std::string model_shape;  // a named real shape with random weights
  std::vector<int> contexts = {4096};
  int batch = 1;
  int steps = 32;
  std::string device = "auto";
};
absl::Status RunBench(const BenchCommand& command);

}  // namespace kvplan
