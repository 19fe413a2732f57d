// The continuous-batching scheduler on the CPU runtime without HTTP: a request whose KV reservation does not fit
// beside a running one waits for it, greedy requests batched together give the tokens they give alone, and every
// way a request is refused or ended has its status.
#include "serve/scheduler.h"

#include <thread>

#include "loader/open_model.h"
#include "plans/cache_policy.h"
#include "runtime/backend.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

constexpr int kCapacity = 64;

struct Finished {
  std::vector<int32_t> tokens;
  GenerationStream::Update end;
};

Finished Drain(GenerationStream& stream) {
  Finished finished;
  while (!finished.end.finished) {
    finished.end = stream.Next(std::chrono::milliseconds(100));
    finished.tokens.insert(finished.tokens.end(), finished.end.tokens.begin(), finished.end.tokens.end());
  }
  return finished;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<LoadedModel> loaded = OpenModel(testing::FixtureModelDir());
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    loaded_ = std::move(*loaded);
    const ModelConfig& c = loaded_.config;
    full_bytes_ = [c](int64_t length) { return FullCacheBytes(c.num_layers, c.num_kv_heads, c.head_dim, length); };
  }

  std::unique_ptr<Model> MakeModel(int sequences) {
    auto model = CreateModel(loaded_.config, *loaded_.weights,
                             {.backend = Backend::kCpu, .num_sequences = sequences, .capacity = kCapacity});
    EXPECT_TRUE(model.ok()) << model.status();
    return model.ok() ? std::move(*model) : nullptr;
  }

  SchedulerOptions Options(int64_t kv_positions, int max_queue) const {
    return {.kv_memory_bytes = full_bytes_(kv_positions),
            .max_queue = max_queue,
            .max_step_rows = 64,
            .prefill_chunk_rows = 5,  // prompts join over several steps
            .kv_bytes = full_bytes_,
            .full_kv_bytes = full_bytes_};
  }

  static GenerationRequest Greedy(std::vector<int32_t> prompt, int max_tokens) {
    return {.prompt = std::move(prompt), .max_tokens = max_tokens, .sampling = {.temperature = 0}};
  }

  LoadedModel loaded_;
  std::function<int64_t(int64_t)> full_bytes_;
};

TEST_F(SchedulerTest, BatchedGreedyTokensEqualTokensAlone) {
  const std::vector<std::vector<int32_t>> prompts = {{0, 11, 12, 13, 14, 15, 16, 17}, {0, 21, 22}, {0, 31, 32, 33, 34}};
  std::vector<std::vector<int32_t>> alone;
  {
    std::unique_ptr<Model> model = MakeModel(1);
    Scheduler scheduler(*model, Options(kCapacity, 8));
    for (const auto& prompt : prompts) {
      KVPLAN_ASSERT_OK_AND_ASSIGN(stream, scheduler.Submit(Greedy(prompt, 12)));
      alone.push_back(Drain(*stream).tokens);
    }
  }
  std::unique_ptr<Model> model = MakeModel(3);
  Scheduler scheduler(*model, Options(3 * kCapacity, 8));
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (const auto& prompt : prompts) {
    KVPLAN_ASSERT_OK_AND_ASSIGN(stream, scheduler.Submit(Greedy(prompt, 12)));
    streams.push_back(stream);
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Finished finished = Drain(*streams[i]);
    EXPECT_EQ(finished.tokens, alone[i]) << "prompt " << i;
    EXPECT_EQ(finished.end.reason, FinishReason::kLength);
  }
}

TEST_F(SchedulerTest, ARequestThatDoesNotFitYetWaitsForMemory) {
  std::unique_ptr<Model> model = MakeModel(2);
  // Room for 60 positions: requests of 54 and 34 have sequences enough but not memory for both at once.
  Scheduler scheduler(*model, Options(60, 4));
  KVPLAN_ASSERT_OK_AND_ASSIGN(first, scheduler.Submit(Greedy({0, 1, 2, 3}, 50)));
  KVPLAN_ASSERT_OK_AND_ASSIGN(second, scheduler.Submit(Greedy({0, 4, 5, 6}, 30)));
  // Watched without pausing: the first request runs for only 50 steps of a small model.
  bool waited = false;
  for (const auto start = std::chrono::steady_clock::now();
       !waited && std::chrono::steady_clock::now() - start < std::chrono::seconds(30);) {
    const ServingGauges gauges = scheduler.Gauges();
    waited = gauges.running == 1 && gauges.queued == 1;
    EXPECT_LE(gauges.reserved_kv_bytes, gauges.kv_memory_bytes);
    if (gauges.running + gauges.queued < 2) break;  // the first one is done: too late to look
  }
  EXPECT_TRUE(waited);
  EXPECT_EQ(Drain(*first).tokens.size(), 50u);
  EXPECT_EQ(Drain(*second).tokens.size(), 30u);
  EXPECT_EQ(scheduler.Gauges().reserved_kv_bytes, 0);
}

TEST_F(SchedulerTest, RefusalsCancellationAndShutdown) {
  std::unique_ptr<Model> model = MakeModel(1);
  Scheduler scheduler(*model, Options(60, 1));
  EXPECT_EQ(scheduler.Submit(Greedy({}, 4)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(scheduler.Submit(Greedy({0, 1}, 0)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(scheduler.Submit({.prompt = {0, 1}, .max_tokens = 4, .sampling = {.top_p = 0}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(scheduler.Submit(Greedy({0, 1}, kCapacity)).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(scheduler.Submit(Greedy({0, 1}, 60)).status().code(), absl::StatusCode::kResourceExhausted);

  // One sequence and one place in the queue: a third request is turned away.
  KVPLAN_ASSERT_OK_AND_ASSIGN(running, scheduler.Submit(Greedy({0, 1, 2}, 55)));
  KVPLAN_ASSERT_OK_AND_ASSIGN(waiting, scheduler.Submit(Greedy({0, 3}, 4)));
  EXPECT_EQ(scheduler.Submit(Greedy({0, 4}, 4)).status().code(), absl::StatusCode::kUnavailable);

  // Cancelling the running one frees its sequence for the waiting one.
  running->Cancel();
  const Finished cancelled = Drain(*running);
  EXPECT_EQ(cancelled.end.reason, FinishReason::kCancelled);
  EXPECT_LT(cancelled.tokens.size(), 55u);
  EXPECT_EQ(Drain(*waiting).end.reason, FinishReason::kLength);

  // Shutdown ends what is running with Unavailable and refuses what comes after.
  KVPLAN_ASSERT_OK_AND_ASSIGN(last, scheduler.Submit(Greedy({0, 5}, 55)));
  scheduler.Shutdown();
  const Finished ended = Drain(*last);
  EXPECT_EQ(ended.end.reason, FinishReason::kError);
  EXPECT_EQ(ended.end.error.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(scheduler.Submit(Greedy({0, 6}, 4)).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kvplan
