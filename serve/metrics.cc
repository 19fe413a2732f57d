#include "serve/metrics.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvplan {
namespace {

std::string Header(const std::string& name, const std::string& type, const std::string& help) {
  return absl::StrCat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

std::string Gauge(const std::string& name, const std::string& help, int64_t value) {
  return absl::StrCat(Header(name, "gauge", help), name, " ", value, "\n");
}

}  // namespace

void Summary::Observe(double value) {
  std::lock_guard lock(mutex_);
  recent_.push_back(value);
  if (recent_.size() > kWindow) recent_.pop_front();
  sum_ += value;
  ++count_;
}

std::string Summary::Render(const std::string& name, const std::string& help) const {
  std::lock_guard lock(mutex_);
  std::string text = Header(name, "summary", help);
  std::vector<double> sorted(recent_.begin(), recent_.end());
  std::sort(sorted.begin(), sorted.end());
  for (double quantile : {0.5, 0.9, 0.99}) {
    // Nearest rank; NaN (Prometheus's "no data") before the first observation.
    const double value =
        sorted.empty() ? NAN : sorted[std::min(sorted.size() - 1, size_t(std::ceil(quantile * sorted.size())) - 1)];
    absl::StrAppend(&text, name, "{quantile=\"", quantile, "\"} ", absl::StrFormat("%.6g", value), "\n");
  }
  absl::StrAppend(&text, name, "_sum ", absl::StrFormat("%.6g", sum_), "\n", name, "_count ", count_, "\n");
  return text;
}

void ServeMetrics::CountResponse(int status) {
  std::lock_guard lock(mutex_);
  ++responses_[status];
}

void ServeMetrics::CountFinished(int64_t prompt_tokens, int64_t completion_tokens, const std::string& reason) {
  std::lock_guard lock(mutex_);
  prompt_tokens_ += prompt_tokens;
  completion_tokens_ += completion_tokens;
  ++finished_[reason];
}

std::string ServeMetrics::Render(const ServingGauges& gauges) const {
  std::string text;
  {
    std::lock_guard lock(mutex_);
    text += Header("kvplan_http_responses_total", "counter", "HTTP responses sent, by status code.");
    for (const auto& [status, count] : responses_)
      absl::StrAppend(&text, "kvplan_http_responses_total{status=\"", status, "\"} ", count, "\n");
    text += Header("kvplan_generations_total", "counter",
                   "Generations the scheduler finished, by reason (stop, length, cancelled, error).");
    for (const auto& [reason, count] : finished_)
      absl::StrAppend(&text, "kvplan_generations_total{reason=\"", reason, "\"} ", count, "\n");
    absl::StrAppend(&text, Header("kvplan_prompt_tokens_total", "counter", "Prompt tokens of finished generations."),
                    "kvplan_prompt_tokens_total ", prompt_tokens_, "\n",
                    Header("kvplan_completion_tokens_total", "counter", "Tokens generated."),
                    "kvplan_completion_tokens_total ", completion_tokens_, "\n");
  }
  text += Gauge("kvplan_requests_running", "Generations holding a sequence of the batch.", gauges.running);
  text += Gauge("kvplan_requests_queued", "Generations waiting for a sequence or KV memory.", gauges.queued);
  text += Gauge("kvplan_max_batch", "Sequences the model decodes together.", gauges.max_batch);
  text += Gauge("kvplan_kv_cache_bytes", "Bytes the KV caches hold now (compressed entries at their packed size).",
                gauges.kv_bytes);
  text += Gauge("kvplan_kv_full_cache_bytes", "Bytes a full bf16 KV cache of the same positions would hold.",
                gauges.full_kv_bytes);
  text += Gauge("kvplan_kv_reserved_bytes", "KV bytes the running generations may grow to (admission control).",
                gauges.reserved_kv_bytes);
  text += Gauge("kvplan_kv_memory_limit_bytes", "The admission limit on reserved KV bytes (--kv-memory).",
                gauges.kv_memory_bytes);
  text += time_to_first_token_.Render("kvplan_time_to_first_token_seconds",
                                      "From a generation's arrival to its first token.");
  text += decode_rate_.Render("kvplan_decode_tokens_per_second",
                              "Tokens per second of each generation after its first token.");
  text += request_latency_.Render("kvplan_generation_seconds", "From a generation's arrival to its end.");
  return text;
}

}  // namespace kvplan
