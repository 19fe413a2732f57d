// The files a command reads and writes, and the checks that keep a command from losing any of them. They run
// before any work, so a bad output path costs nothing.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvplan {

// What an output holds; an existing file may be replaced without --force only by one of its own kind.
enum class OutputKind { kPlan, kEvalReport, kNeedlePrompts, kSweepTable, kSweepPlot };

struct OutputFile {
  std::string path;
  OutputKind kind;
};

struct CommandFiles {
  std::vector<std::string> reads;  // existing ones are protected; missing ones are their readers' to report
  std::vector<OutputFile> writes;
};

// The files of a model directory a command reads: config.json, tokenizer.json, the safetensors index and every
// *.safetensors file.
std::vector<std::string> ModelFiles(const std::string& model_dir);

// Each output's path is not empty, its directory exists and is writable; no output is a file the command reads
// (the same device and inode, whatever path or link leads to it) or another output; an existing output is a
// regular file (never a device or a FIFO, even with `force`) that holds what kvplan writes there (a plan over a
// plan, an eval report over an eval report), unless `force`.
absl::Status CheckOutputFiles(const CommandFiles& files, bool force);

}  // namespace kvplan
