#include "eval/bench.h"

#include <algorithm>
#include <chrono>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvplan {
namespace {

using Json = nlohmann::ordered_json;

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Seconds to feed `context` tokens to sequence 0 from an empty cache, in passes of `rows` rows. The ids only need
// to be valid: speed does not depend on them.
absl::StatusOr<double> TimePrefill(Model& model, int context, int rows) {
  model.Reset();
  std::vector<int32_t> tokens(context);
  for (int i = 0; i < context; ++i)
    tokens[i] = 1 + int32_t((int64_t(i) * 7919) % std::max(1, model.config().vocab_size - 1));
  const auto start = std::chrono::steady_clock::now();
  for (int first = 0; first < context; first += rows) {
    const int end = std::min(context, first + rows);
    KVPLAN_RETURN_IF_ERROR(
        model
            .Forward(SequenceRows(std::vector<int32_t>(tokens.begin() + first, tokens.begin() + end), 0, first),
                     LogitRows::kLastPerSequence)
            .status());
  }
  return SecondsSince(start);
}

// Seconds per decode step of every sequence at once, after `warmup` untimed steps, from caches at `context`.
absl::StatusOr<double> TimeDecode(Model& model, const BenchOptions& options) {
  StepRows rows;
  for (int s = 0; s < model.num_sequences(); ++s) {
    rows.tokens.push_back(1 + s);
    rows.sequences.push_back(s);
    rows.positions.push_back(options.context);
  }
  double seconds = 0;
  for (int step = 0; step < options.warmup + options.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    // Forward returns after the logits reach the host, so wall time covers the whole step.
    KVPLAN_RETURN_IF_ERROR(model.Forward(rows, LogitRows::kLastPerSequence).status());
    if (step >= options.warmup) seconds += SecondsSince(start);
    for (int32_t& position : rows.positions) ++position;
  }
  return seconds / options.steps;
}

Json SpreadJson(const Spread& spread, double scale = 1) {
  return {{"median", spread.median * scale}, {"min", spread.min * scale}, {"max", spread.max * scale}};
}

}  // namespace

Spread SpreadOf(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  const double median = n % 2 == 1 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2;
  return {.median = median, .min = samples.front(), .max = samples.back()};
}

absl::StatusOr<BenchResult> BenchDecode(Model& model, const BenchOptions& options) {
  if (options.context + options.warmup + options.steps > model.capacity())
    return absl::InvalidArgumentError(absl::StrCat("context + steps exceed the cache capacity ", model.capacity()));
  if (options.repetitions <= 0 || options.steps <= 0 || options.prefill_rows <= 0)
    return absl::InvalidArgumentError("repetitions, steps and prefill rows must be positive");
  const int batch = model.num_sequences();
  std::vector<double> step_seconds, decode_rates, prefill_rates;
  int64_t kv_cache_bytes = 0;
  for (int repetition = 0; repetition < options.repetitions; ++repetition) {
    if (options.prefill) {
      KVPLAN_ASSIGN_OR_RETURN(const double seconds, TimePrefill(model, options.context, options.prefill_rows));
      prefill_rates.push_back(options.context / seconds);
    }
    // The caches at `context`, before the decode steps add to them.
    KVPLAN_RETURN_IF_ERROR(model.FillCacheWithNoise(options.context));
    kv_cache_bytes = model.kv_cache_bytes();
    KVPLAN_ASSIGN_OR_RETURN(const double seconds, TimeDecode(model, options));
    step_seconds.push_back(seconds);
    decode_rates.push_back(batch / seconds);
  }
  BenchResult result;
  result.device = model.device_name();
  result.context = options.context;
  result.batch = batch;
  result.repetitions = options.repetitions;
  result.seconds_per_step = SpreadOf(step_seconds);
  result.tokens_per_second = SpreadOf(decode_rates);
  if (options.prefill) result.prefill_tokens_per_second = SpreadOf(prefill_rates);
  result.kv_cache_bytes = kv_cache_bytes;
  result.bytes_per_step = model.weight_bytes() + result.kv_cache_bytes;
  result.achieved_gb_per_second = result.bytes_per_step / result.seconds_per_step.median / 1e9;
  return result;
}

std::string BenchReportJson(const std::vector<BenchResult>& results, const std::string& plan_path, int steps) {
  Json json = {{"schema_version", kBenchReportSchemaVersion},
               {"device", results.empty() ? "" : results.front().device},
               {"plan", plan_path.empty() ? Json(nullptr) : Json(plan_path)},
               {"steps", steps},
               {"repetitions", results.empty() ? 0 : results.front().repetitions},
               {"results", Json::array()}};
  for (const BenchResult& result : results) {
    Json entry = {{"context", result.context},
                  {"batch", result.batch},
                  {"kv_bytes", result.kv_cache_bytes},
                  {"bytes_per_step", result.bytes_per_step},
                  {"gb_per_second", result.achieved_gb_per_second},
                  {"decode",
                   {{"tokens_per_second", SpreadJson(result.tokens_per_second)},
                    {"ms_per_step", SpreadJson(result.seconds_per_step, 1e3)}}}};
    if (result.prefill_tokens_per_second)
      entry["prefill"] = {{"tokens", result.context},
                          {"tokens_per_second", SpreadJson(*result.prefill_tokens_per_second)}};
    json["results"].push_back(std::move(entry));
  }
  return json.dump();
}

std::string BenchTableHeader() {
  return absl::StrFormat("%-12s %8s %6s %12s %21s %10s %12s %8s %14s\n", "device", "context", "batch", "tokens/s",
                         "(min - max)", "ms/step", "KV bytes", "GB/s", "prefill tok/s");
}

std::string BenchTableRow(const BenchResult& result) {
  return absl::StrFormat(
      "%-12s %8d %6d %12.1f %21s %10.3f %12d %8.1f %14s\n", result.device.substr(0, 12), result.context, result.batch,
      result.tokens_per_second.median,
      absl::StrFormat("(%.1f - %.1f)", result.tokens_per_second.min, result.tokens_per_second.max),
      result.seconds_per_step.median * 1e3, result.kv_cache_bytes, result.achieved_gb_per_second,
      result.prefill_tokens_per_second ? absl::StrFormat("%.1f", result.prefill_tokens_per_second->median) : "-");
}

}  // namespace kvplan
