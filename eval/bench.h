// Speed at a given context length and batch: decode steps against the memory-traffic floor, repeated so the
// spread shows, and the prefill of a prompt as long as the context.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model.h"

namespace kvplan {

struct BenchOptions {
  int context = 4096;       // tokens already in each sequence's cache when timing starts
  int steps = 32;           // timed decode steps per repetition
  int warmup = 3;           // untimed decode steps before each repetition's
  int repetitions = 3;      // each from a cache refilled to `context`
  bool prefill = true;      // also time a prefill of `context` tokens into sequence 0's empty cache, per repetition
  int prefill_rows = 2048;  // rows per Forward of the prefill, at most the model's max_rows
};

// The median and the extremes of repeated measurements.
struct Spread {
  double median = 0, min = 0, max = 0;
};
Spread SpreadOf(std::vector<double> samples);  // samples must not be empty

struct BenchResult {
  std::string device;
  int context = 0;
  int batch = 0;
  int repetitions = 0;
  Spread seconds_per_step;
  Spread tokens_per_second;                         // batch / seconds_per_step of each repetition
  std::optional<Spread> prefill_tokens_per_second;  // context / the prefill's seconds; when measured
  int64_t kv_cache_bytes = 0;                       // all sequences, at `context`
  int64_t bytes_per_step = 0;         // weights once + every sequence's KV cache: the traffic floor of a step
  double achieved_gb_per_second = 0;  // bytes_per_step / the median seconds_per_step
};

// Per repetition: the prefill (when asked for) from an empty cache, then every sequence's cache filled to `context`
// with noise and batched decode steps timed. InvalidArgument when context + warmup + steps exceed the capacity.
absl::StatusOr<BenchResult> BenchDecode(Model& model, const BenchOptions& options);

// Bumped when a key changes meaning or moves; adding keys keeps the version.
inline constexpr int kBenchReportSchemaVersion = 1;

// One line of JSON:
//   {"schema_version": 1, "device", "plan" (null: the full cache), "steps", "repetitions",
//    "results": [{"context", "batch", "kv_bytes", "bytes_per_step", "gb_per_second",
//                 "decode": {"tokens_per_second": {"median", "min", "max"}, "ms_per_step": {...}},
//                 "prefill": {"tokens", "tokens_per_second": {...}}}]}
// "prefill" is left out where it was not measured.
std::string BenchReportJson(const std::vector<BenchResult>& results, const std::string& plan_path, int steps);

// A table for people, printed a row at a time as the contexts finish: the header line, and a result's line.
std::string BenchTableHeader();
std::string BenchTableRow(const BenchResult& result);

}  // namespace kvplan
