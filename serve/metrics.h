// What the server counts, and its Prometheus text exposition (GET /metrics). Counters and summaries are safe to
// update from any thread; the scheduler's loop, the HTTP handlers and the request logger all do.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>

namespace kvplan {

// A Prometheus summary: the quantiles of the most recent observations (a sliding window), and the count and sum
// of all of them.
class Summary {
 public:
  static constexpr size_t kWindow = 1024;
  void Observe(double value);
  // `name`'s lines: name{quantile="0.5"} ..., name_sum, name_count.
  std::string Render(const std::string& name, const std::string& help) const;

 private:
  mutable std::mutex mutex_;
  std::deque<double> recent_;
  double sum_ = 0;
  int64_t count_ = 0;
};

// The gauges the scheduler reports when /metrics is read.
struct ServingGauges {
  int running = 0, queued = 0, max_batch = 0;
  int64_t kv_bytes = 0;           // the runtime's KV caches now (compressed entries at their packed size)
  int64_t full_kv_bytes = 0;      // a full bf16 cache of as many positions
  int64_t reserved_kv_bytes = 0;  // what admitted requests may grow to (admission control counts this)
  int64_t kv_memory_bytes = 0;    // the admission limit
};

class ServeMetrics {
 public:
  void CountResponse(int status);  // every HTTP response, by status
  // A request the scheduler finished: tokens it read and wrote; finish reason stop | length | cancelled | error.
  void CountFinished(int64_t prompt_tokens, int64_t completion_tokens, const std::string& reason);
  void ObserveTimeToFirstToken(double seconds) { time_to_first_token_.Observe(seconds); }
  void ObserveDecodeRate(double tokens_per_second) { decode_rate_.Observe(tokens_per_second); }
  void ObserveRequestLatency(double seconds) { request_latency_.Observe(seconds); }

  std::string Render(const ServingGauges& gauges) const;

 private:
  mutable std::mutex mutex_;
  std::map<int, int64_t> responses_;         // by HTTP status
  std::map<std::string, int64_t> finished_;  // by finish reason
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  Summary time_to_first_token_, decode_rate_, request_latency_;
};

}  // namespace kvplan
