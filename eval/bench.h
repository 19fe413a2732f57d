// Decode-speed measurement at a given context length and batch, against the memory-traffic floor.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/model.h"

namespace kvplan {

struct BenchOptions {
  int context = 4096;  // tokens already in each sequence's cache when timing starts
  int steps = 32;      // timed decode steps
  int warmup = 3;
};

struct BenchResult {
  std::string device;
  int context = 0;
  int batch = 0;
  double seconds_per_step = 0;
  double tokens_per_second = 0;       // batch / seconds_per_step
  int64_t kv_cache_bytes = 0;         // all sequences, at `context`
  int64_t bytes_per_step = 0;         // weights once + every sequence's KV cache: the traffic floor of a step
  double achieved_gb_per_second = 0;  // bytes_per_step / seconds_per_step
};

// Fills every sequence's cache to `context` with noise, then times batched decode steps.
absl::StatusOr<BenchResult> BenchDecode(Model& model, const BenchOptions& options);

}  // namespace kvplan
