// Continuous batching over one Model: each of its sequences is a slot a request holds from admission to its
// end. A loop thread forms every step from the slots' requests, a chunk of prompt for those still reading it and
// one row for those decoding, runs one Forward, samples each sequence that is done reading, and streams the
// tokens out; requests join and leave between steps, and a finished or cancelled request's sequence is reset
// for the next one. Admission control: a request reserves the KV bytes its prompt plus max_tokens can take
// under the cache policy, and waits in a bounded queue until a slot and that memory are free.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model.h"
#include "runtime/sampling.h"
#include "serve/metrics.h"

namespace kvplan {

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, BOS included where the model wants one
  int max_tokens = 16;
  SamplingSettings sampling;
  std::vector<int32_t> stop_token_ids;  // a sampled id among these ends generation and is not returned
};

enum class FinishReason { kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason reason);  // stop | length | cancelled | error

// One request's tokens, written by the scheduler's loop and read by the request's handler.
class GenerationStream {
 public:
  struct Update {
    std::vector<int32_t> tokens;  // new since the last update
    bool finished = false;
    FinishReason reason = FinishReason::kStop;
    absl::Status error;  // with kError
  };
  // Waits up to `timeout` for new tokens or the end.
  Update Next(std::chrono::milliseconds timeout);
  // The client left, or a stop string ended the text: the scheduler frees the sequence before its next step.
  void Cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

 private:
  friend class Scheduler;
  void Push(int32_t token);
  void Finish(FinishReason reason, absl::Status error);

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<int32_t> pending_;
  bool finished_ = false;
  FinishReason reason_ = FinishReason::kStop;
  absl::Status error_;
  std::atomic<bool> cancelled_{false};
};

struct SchedulerOptions {
  int64_t kv_memory_bytes = 0;   // admission limit on the reserved KV bytes of running requests
  int max_queue = 64;            // requests waiting for a slot or memory; more are refused
  int max_step_rows = 512;       // rows of one Forward: more than the model has sequences, so prompts can join
  int prefill_chunk_rows = 512;  // prompt rows a joining request feeds per step (kPlannedChunkRows with a plan)
  // KV bytes one sequence of `length` positions holds under the cache policy, and under a full bf16 cache.
  std::function<int64_t(int64_t length)> kv_bytes;
  std::function<int64_t(int64_t length)> full_kv_bytes;
  ServeMetrics* metrics = nullptr;  // optional
};

class Scheduler {
 public:
  // `model` must outlive the scheduler; its sequences are the slots. Starts the loop thread.
  Scheduler(Model& model, SchedulerOptions options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request. InvalidArgument: an empty prompt or bad settings; OutOfRange: more positions than a sequence
  // holds; ResourceExhausted: its KV reservation exceeds the whole limit (it could never run); Unavailable: the
  // queue is full or the scheduler is shutting down.
  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest request);

  // Ends every request with an Unavailable error and stops the loop; Submit refuses from then on.
  void Shutdown();

  ServingGauges Gauges() const;

 private:
  struct Waiting {
    GenerationRequest request;
    std::shared_ptr<GenerationStream> stream;
    std::chrono::steady_clock::time_point arrival;
    int64_t reservation = 0;
  };
  struct Running;

  void Loop();
  // Moves waiting requests into free slots while their reservations fit; drops cancelled ones.
  void Admit(std::vector<Running>& running);
  absl::Status Step(std::vector<Running>& running);
  // Ends `request`, resets its sequence and frees its reservation.
  void Finish(Running& request, FinishReason reason, absl::Status error = absl::OkStatus());

  Model& model_;
  const SchedulerOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable work_;
  std::deque<Waiting> queue_;
  std::vector<int> free_slots_;
  bool stopping_ = false;
  // Read by Gauges from other threads.
  std::atomic<int> running_count_{0};
  std::atomic<int64_t> reserved_bytes_{0}, kv_bytes_{0}, full_kv_bytes_{0};
  std::thread loop_;
};

}  // namespace kvplan
