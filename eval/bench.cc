#include "eval/bench.h"

#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvplan {

absl::StatusOr<BenchResult> BenchDecode(Model& model, const BenchOptions& options) {
  if (options.context + options.warmup + options.steps > model.capacity())
    return absl::InvalidArgumentError(absl::StrCat("context + steps exceed the cache capacity ", model.capacity()));
  KVPLAN_RETURN_IF_ERROR(model.FillCacheWithNoise(options.context));
  const int64_t kv_cache_bytes = model.kv_cache_bytes();
  const int batch = model.num_sequences();
  StepRows rows;
  for (int s = 0; s < batch; ++s) {
    rows.tokens.push_back(1 + s);
    rows.sequences.push_back(s);
    rows.positions.push_back(options.context);
  }
  double seconds = 0;
  for (int step = 0; step < options.warmup + options.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    // Forward returns after the logits reach the host, so wall time covers the whole step.
    KVPLAN_ASSIGN_OR_RETURN(std::vector<float> logits, model.Forward(rows, LogitRows::kLastPerSequence));
    if (step >= options.warmup)
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (int32_t& position : rows.positions) ++position;
  }
  BenchResult result;
  result.device = model.device_name();
  result.context = options.context;
  result.batch = batch;
  result.seconds_per_step = seconds / options.steps;
  result.tokens_per_second = batch / result.seconds_per_step;
  result.kv_cache_bytes = kv_cache_bytes;
  result.bytes_per_step = model.weight_bytes() + result.kv_cache_bytes;
  result.achieved_gb_per_second = result.bytes_per_step / result.seconds_per_step / 1e9;
  return result;
}

}  // namespace kvplan
