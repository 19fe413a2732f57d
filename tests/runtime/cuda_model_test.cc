// The CUDA runtime against transformers' fp32 logits and the CPU runtime. The GPU keeps weights, activations
// between GEMMs and the KV cache in bf16, so logits differ from fp32 by ~1e-2 relative (stated tolerance 3e-2).
#include "runtime/cuda/cuda_model.h"

#include "loader/safetensors.h"
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

}  // namespace
}  // namespace kvplan
