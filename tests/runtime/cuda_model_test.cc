// The CUDA runtime against transformers' fp32 logits and the CPU runtime. The GPU keeps weights, activations
// between GEMMs and the KV cache in bf16, so logits differ from fp32 by ~1e-2 relative (stated tolerance 3e-2).
#include "runtime/cuda/cuda_model.h"

#include "loader/safetensors.h"
#include "runtime/backend.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/cpu/cpu_model.h"
#include "tests/testing/cuda_test_util.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

constexpr double kBf16RuntimeTolerance = 3e-2;

TEST(CudaModelTest, LogitsMatchTransformersAndDecodeMatchesPrefill) {
  KVPLAN_SKIP_WITHOUT_GPU();
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModelDirectory(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(model, CreateCudaModel(loaded.config, *loaded.weights, {}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(reference, Checkpoint::OpenFile(testing::FixtureModelDir() + "/reference.safetensors"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(ids, reference->ReadInt32("input_ids"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(expected, reference->ReadFloat("logits_last8", {8, 4096}));
  const int vocab = loaded.config.vocab_size;

  KVPLAN_ASSERT_OK_AND_ASSIGN(logits, model->Forward(SequenceRows(ids, 0, 0), LogitRows::kAll));
  const double prefill_error =
      testing::RelativeError(logits.data() + (ids.size() - 8) * vocab, expected.data(), 8 * vocab);
  EXPECT_LT(prefill_error, kBf16RuntimeTolerance);
  RecordProperty("prefill_relative_error", std::to_string(prefill_error));

  model->Reset();
  const std::vector<int32_t> prompt(ids.begin(), ids.end() - 8);
  ASSERT_TRUE(model->Forward(SequenceRows(prompt, 0, 0), LogitRows::kLastPerSequence).ok());
  for (int i = 0; i < 8; ++i) {
    const int position = int(ids.size()) - 8 + i;
    KVPLAN_ASSERT_OK_AND_ASSIGN(step, model->Forward(SequenceRows({ids[position]}, 0, position), LogitRows::kAll));
    EXPECT_LT(testing::RelativeError(step.data(), expected.data() + i * vocab, vocab), kBf16RuntimeTolerance) << i;
  }
}

TEST(CudaModelTest, BatchedDecodeMatchesCpuRuntime) {
  KVPLAN_SKIP_WITHOUT_GPU();
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModelDirectory(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(
      gpu, CreateCudaModel(loaded.config, *loaded.weights, {.num_sequences = 3, .capacity = 100, .max_rows = 64}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(cpu,
                              CreateCpuModel(loaded.config, *loaded.weights, {.num_sequences = 3, .capacity = 100}));
  const std::vector<std::vector<int32_t>> prompts = {{0, 5, 6, 7}, {0, 100, 200, 300, 400, 500, 600}, {0, 42}};
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(gpu->Forward(SequenceRows(prompts[s], s, 0), LogitRows::kLastPerSequence).ok());
    ASSERT_TRUE(cpu->Forward(SequenceRows(prompts[s], s, 0), LogitRows::kLastPerSequence).ok());
  }
  const StepRows step = {{9, 10, 11}, {0, 1, 2}, {4, 7, 2}};
  KVPLAN_ASSERT_OK_AND_ASSIGN(gpu_logits, gpu->Forward(step, LogitRows::kLastPerSequence));
  KVPLAN_ASSERT_OK_AND_ASSIGN(cpu_logits, cpu->Forward(step, LogitRows::kLastPerSequence));
  EXPECT_LT(testing::RelativeError(gpu_logits.data(), cpu_logits.data(), cpu_logits.size()), kBf16RuntimeTolerance);
}

// KVSharer on the GPU: layer 4 attends over layer 1's cache and stores nothing; logits follow the CPU plan path
// through a prefill and 8 decode steps, and both hold the same bytes.
TEST(CudaModelTest, LayerSharingPlanMatchesCpuPlanPath) {
  KVPLAN_SKIP_WITHOUT_GPU();
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModelDirectory(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(reference, Checkpoint::OpenFile(testing::FixtureModelDir() + "/reference.safetensors"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(ids, reference->ReadInt32("input_ids"));
  plan::Plan plan;
  *plan.mutable_model() = FingerprintModel(loaded.config, *loaded.weights);
  auto* share = plan.mutable_sharing()->add_shares();
  share->set_layer(4);
  share->set_donor(1);
  const ModelOptions options{.capacity = 512, .max_rows = 512, .plan = &plan};
  ModelOptions gpu_options = options, cpu_options = options;
  gpu_options.backend = Backend::kCuda;
  cpu_options.backend = Backend::kCpu;
  KVPLAN_ASSERT_OK_AND_ASSIGN(gpu, CreateModel(loaded.config, *loaded.weights, gpu_options));
  KVPLAN_ASSERT_OK_AND_ASSIGN(cpu, CreateModel(loaded.config, *loaded.weights, cpu_options));
  KVPLAN_ASSERT_OK_AND_ASSIGN(dense, CreateCudaModel(loaded.config, *loaded.weights, {.capacity = 512}));

  const std::vector<int32_t> prompt(ids.begin(), ids.end() - 8);
  KVPLAN_ASSERT_OK_AND_ASSIGN(gpu_prefill, gpu->Forward(SequenceRows(prompt, 0, 0), LogitRows::kLastPerSequence));
  KVPLAN_ASSERT_OK_AND_ASSIGN(cpu_prefill, cpu->Forward(SequenceRows(prompt, 0, 0), LogitRows::kLastPerSequence));
  KVPLAN_ASSERT_OK_AND_ASSIGN(dense_prefill, dense->Forward(SequenceRows(prompt, 0, 0), LogitRows::kLastPerSequence));
  EXPECT_LT(testing::RelativeError(gpu_prefill.data(), cpu_prefill.data(), cpu_prefill.size()), kBf16RuntimeTolerance);
  // The share really happens: the full cache gives other logits.
  EXPECT_GT(testing::RelativeError(dense_prefill.data(), gpu_prefill.data(), gpu_prefill.size()), 1e-3);
  for (int position = int(prompt.size()); position < int(ids.size()); ++position) {
    KVPLAN_ASSERT_OK_AND_ASSIGN(gpu_step, gpu->Forward(SequenceRows({ids[position]}, 0, position), LogitRows::kAll));
    KVPLAN_ASSERT_OK_AND_ASSIGN(cpu_step, cpu->Forward(SequenceRows({ids[position]}, 0, position), LogitRows::kAll));
    EXPECT_LT(testing::RelativeError(gpu_step.data(), cpu_step.data(), cpu_step.size()), kBf16RuntimeTolerance)
        << position;
  }
  EXPECT_EQ(gpu->kv_cache_bytes(), cpu->kv_cache_bytes());
  // Layer 4's K and V projections (bf16, [kv_dim, hidden] each) never reach the device.
  const ModelConfig& c = loaded.config;
  EXPECT_EQ(dense->weight_bytes() - gpu->weight_bytes(), 2 * int64_t(c.kv_dim()) * c.hidden_size * 2);
  EXPECT_EQ(gpu->kv_cache_bytes(), CacheBytes(CachePolicyFromPlan(plan), int64_t(ids.size())));
}

// Methods the CUDA runtime does not execute yet are refused by name, not run as a full cache.
TEST(CudaModelTest, UnexecutedMethodsAreRefused) {
  KVPLAN_SKIP_WITHOUT_GPU();
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModelDirectory(testing::FixtureModelDir()));
  plan::Plan plan;
  *plan.mutable_model() = FingerprintModel(loaded.config, *loaded.weights);
  plan.mutable_budgets()->set_scoring(plan::TokenBudgets::KEY_L2_NORM);
  auto* budget = plan.mutable_budgets()->add_layers();
  budget->set_layer(2);
  for (int h = 0; h < loaded.config.num_kv_heads; ++h) budget->add_head_keep_fraction(0.5f);
  const auto refused =
      CreateModel(loaded.config, *loaded.weights, {.backend = Backend::kCuda, .capacity = 64, .plan = &plan});
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(refused.status().message().find("token budgets"), std::string::npos) << refused.status();
  // auto falls back to the CPU runtime, which executes it.
  KVPLAN_ASSERT_OK_AND_ASSIGN(fallback, CreateModel(loaded.config, *loaded.weights, {.capacity = 64, .plan = &plan}));
  EXPECT_EQ(fallback->device_name(), "cpu+plan");
}

}  // namespace
}  // namespace kvplan
