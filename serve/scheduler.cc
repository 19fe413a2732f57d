#include "serve/scheduler.h"

#include <algorithm>
#include <span>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvplan {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "error";
}

GenerationStream::Update GenerationStream::Next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  changed_.wait_for(lock, timeout, [this] { return !pending_.empty() || finished_; });
  Update update{.tokens = std::move(pending_), .finished = finished_, .reason = reason_, .error = error_};
  pending_.clear();
  return update;
}

void GenerationStream::Push(int32_t token) {
  {
    std::lock_guard lock(mutex_);
    pending_.push_back(token);
  }
  changed_.notify_all();
}

void GenerationStream::Finish(FinishReason reason, absl::Status error) {
  {
    std::lock_guard lock(mutex_);
    finished_ = true;
    reason_ = reason;
    error_ = std::move(error);
  }
  changed_.notify_all();
}

struct Scheduler::Running {
  Waiting waiting;
  Sampler sampler;
  int sequence = 0;
  int prompt_fed = 0;  // prompt tokens in the cache
  int generated = 0;   // tokens sampled and sent
  int32_t last_token = 0;
  int step_rows = 0;  // rows this request has in the current step
  std::chrono::steady_clock::time_point first_token;

  const std::vector<int32_t>& prompt() const { return waiting.request.prompt; }
  bool reading_prompt() const { return prompt_fed < int(prompt().size()); }
};

Scheduler::Scheduler(Model& model, SchedulerOptions options) : model_(model), options_(std::move(options)) {
  for (int s = model_.num_sequences() - 1; s >= 0; --s) free_slots_.push_back(s);
  loop_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() { Shutdown(); }

void Scheduler::Shutdown() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  work_.notify_all();
  loop_.join();
}

absl::StatusOr<std::shared_ptr<GenerationStream>> Scheduler::Submit(GenerationRequest request) {
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  if (request.max_tokens <= 0)
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be positive, got ", request.max_tokens));
  KVPLAN_RETURN_IF_ERROR(ValidateSamplingSettings(request.sampling));
  const int64_t positions = int64_t(request.prompt.size()) + request.max_tokens;
  if (positions > model_.capacity())
    return absl::OutOfRangeError(absl::StrCat("the prompt (", request.prompt.size(), " tokens) and max_tokens (",
                                              request.max_tokens, ") need ", positions,
                                              " positions; the model's context holds ", model_.capacity()));
  const int64_t reservation = options_.kv_bytes(positions);
  if (reservation > options_.kv_memory_bytes)
    return absl::ResourceExhaustedError(absl::StrCat("the prompt and max_tokens need ", reservation,
                                                     " bytes of KV cache; the server's KV memory is ",
                                                     options_.kv_memory_bytes, " bytes"));
  auto stream = std::make_shared<GenerationStream>();
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
    // Requests in the queue beyond the free sequences are the ones that will wait.
    if (int(queue_.size()) >= options_.max_queue + int(free_slots_.size()))
      return absl::UnavailableError(absl::StrCat("the server is busy: every sequence is taken and ", options_.max_queue,
                                                 " requests are waiting already; retry later"));
    queue_.push_back({.request = std::move(request),
                      .stream = stream,
                      .arrival = std::chrono::steady_clock::now(),
                      .reservation = reservation});
  }
  work_.notify_all();
  return stream;
}

ServingGauges Scheduler::Gauges() const {
  std::lock_guard lock(mutex_);
  return {.running = running_count_,
          .queued = int(queue_.size()),
          .max_batch = model_.num_sequences(),
          .kv_bytes = kv_bytes_,
          .full_kv_bytes = full_kv_bytes_,
          .reserved_kv_bytes = reserved_bytes_,
          .kv_memory_bytes = options_.kv_memory_bytes};
}

void Scheduler::Loop() {
  std::vector<Running> running;
  while (true) {
    {
      std::unique_lock lock(mutex_);
      work_.wait(lock, [&] { return stopping_ || !queue_.empty() || !running.empty(); });
      if (stopping_) break;
    }
    Admit(running);
    for (Running& request : running)
      if (request.waiting.stream->cancelled()) Finish(request, FinishReason::kCancelled);
    std::erase_if(running, [](const Running& request) { return request.waiting.stream == nullptr; });
    running_count_ = int(running.size());
    if (running.empty()) continue;
    if (absl::Status status = Step(running); !status.ok()) {
      // A failed step may have written into any of the step's sequences: every request ends.
      for (Running& request : running)
        if (request.waiting.stream) Finish(request, FinishReason::kError, status);
    }
    std::erase_if(running, [](const Running& request) { return request.waiting.stream == nullptr; });
    running_count_ = int(running.size());
    kv_bytes_ = model_.kv_cache_bytes();
    full_kv_bytes_ = options_.full_kv_bytes(model_.cached_positions());
  }
  const absl::Status stopped = absl::UnavailableError("the server shut down before the request finished");
  for (Running& request : running) Finish(request, FinishReason::kError, stopped);
  running_count_ = 0;
  std::lock_guard lock(mutex_);
  for (Waiting& waiting : queue_) waiting.stream->Finish(FinishReason::kError, stopped);
  queue_.clear();
}

void Scheduler::Admit(std::vector<Running>& running) {
  std::lock_guard lock(mutex_);
  // First come, first served: a request that does not fit yet holds back those behind it, so large requests are
  // not starved by small ones.
  std::erase_if(queue_, [this](const Waiting& waiting) {
    if (!waiting.stream->cancelled()) return false;
    waiting.stream->Finish(FinishReason::kCancelled, absl::OkStatus());
    if (options_.metrics) options_.metrics->CountFinished(0, 0, FinishReasonName(FinishReason::kCancelled));
    return true;
  });
  while (!queue_.empty()) {
    Waiting& front = queue_.front();
    if (free_slots_.empty() || reserved_bytes_ + front.reservation > options_.kv_memory_bytes) return;
    absl::StatusOr<Sampler> sampler = Sampler::Create(front.request.sampling);  // settings checked by Submit
    reserved_bytes_ += front.reservation;
    running.push_back(
        Running{.waiting = std::move(front), .sampler = std::move(*sampler), .sequence = free_slots_.back()});
    free_slots_.pop_back();
    queue_.pop_front();
  }
}

absl::Status Scheduler::Step(std::vector<Running>& running) {
  // Decoding requests first, one row each, so a long prompt joining never delays them by more than its chunk.
  StepRows rows;
  std::vector<Running*> order;
  for (Running& request : running) {
    request.step_rows = 0;
    if (request.reading_prompt()) continue;
    rows.tokens.push_back(request.last_token);
    rows.sequences.push_back(request.sequence);
    rows.positions.push_back(int(request.prompt().size()) + request.generated - 1);
    request.step_rows = 1;
    order.push_back(&request);
  }
  for (Running& request : running) {
    const int room = options_.max_step_rows - int(rows.tokens.size());
    if (!request.reading_prompt() || room <= 0) continue;
    const int rows_now =
        std::min({int(request.prompt().size()) - request.prompt_fed, options_.prefill_chunk_rows, room});
    for (int r = 0; r < rows_now; ++r) {
      rows.tokens.push_back(request.prompt()[request.prompt_fed + r]);
      rows.sequences.push_back(request.sequence);
      rows.positions.push_back(request.prompt_fed + r);
    }
    request.step_rows = rows_now;
    order.push_back(&request);
  }
  KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> logits, model_.Forward(rows, LogitRows::kLastPerSequence));
  const int vocab = model_.config().vocab_size;
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < order.size(); ++i) {
    Running& request = *order[i];
    if (request.reading_prompt()) {
      request.prompt_fed += request.step_rows;
      if (request.reading_prompt()) continue;
    }
    KVPLAN_ASSIGN_OR_RETURN(const int32_t token,
                            request.sampler.Sample(std::span<const float>(logits).subspan(i * vocab, vocab)));
    if (request.generated == 0) {
      request.first_token = now;
      if (options_.metrics)
        options_.metrics->ObserveTimeToFirstToken(std::chrono::duration<double>(now - request.waiting.arrival).count());
    }
    const std::vector<int32_t>& stops = request.waiting.request.stop_token_ids;
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      Finish(request, FinishReason::kStop);
      continue;
    }
    ++request.generated;
    request.last_token = token;
    request.waiting.stream->Push(token);
    if (request.generated >= request.waiting.request.max_tokens) Finish(request, FinishReason::kLength);
  }
  return absl::OkStatus();
}

void Scheduler::Finish(Running& request, FinishReason reason, absl::Status error) {
  // Reset is the runtime's bookkeeping for one sequence; failing it would leave the slot unusable, so the slot
  // is dropped from service rather than handed to another request with stale entries.
  const absl::Status reset = model_.ResetSequence(request.sequence);
  if (reset.ok()) {
    std::lock_guard lock(mutex_);
    free_slots_.push_back(request.sequence);
  }
  reserved_bytes_ -= request.waiting.reservation;
  if (options_.metrics) {
    const auto now = std::chrono::steady_clock::now();
    options_.metrics->CountFinished(request.prompt_fed, request.generated, FinishReasonName(reason));
    options_.metrics->ObserveRequestLatency(std::chrono::duration<double>(now - request.waiting.arrival).count());
    if (request.generated > 1) {
      const double decoding = std::chrono::duration<double>(now - request.first_token).count();
      if (decoding > 0) options_.metrics->ObserveDecodeRate((request.generated - 1) / decoding);
    }
  }
  request.waiting.stream->Finish(reason, std::move(error));
  request.waiting.stream = nullptr;
}

}  // namespace kvplan
