// Compressed caches: each method in its lossless limit matches the dense cache; eviction keeps the tokens its
// scoring says; merging keeps the evicted mass; measured bytes agree with the planner's estimate.
#include "loader/open_model.h"
#include "runtime/cache/compressed_cache.h"

#include <random>

#include "loader/safetensors.h"
#include "planner/planner.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/cache/sparse_coding.h"
#include "runtime/cpu/cpu_model.h"
#include "tests/testing/matching_pursuit_check.h"
#include "tests/testing/plan_cases.h"
#include "tests/testing/reset_sequence_check.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

struct Fixture {
  LoadedModel loaded;
  std::vector<int32_t> tokens;
};

Fixture LoadFixture() {
  Fixture fixture{*OpenModel(testing::FixtureModelDir()), {}};
  auto reference = Checkpoint::OpenFile(testing::FixtureModelDir() + "/reference.safetensors");
  fixture.tokens = *(*reference)->ReadInt32("input_ids");
  return fixture;
}

plan::Plan EmptyPlan(const Fixture& fixture) {
  plan::Plan plan;
  *plan.mutable_model() = FingerprintModel(fixture.loaded.config, *fixture.loaded.weights);
  return plan;
}

std::vector<float> Logits(const Fixture& fixture, const plan::Plan* plan, int64_t* kv_bytes = nullptr) {
  absl::StatusOr<std::unique_ptr<Model>> model =
      plan ? CreatePlannedCpuModel(fixture.loaded.config, *fixture.loaded.weights, *plan, {.capacity = 512})
           : CreateCpuModel(fixture.loaded.config, *fixture.loaded.weights, {.capacity = 512});
  EXPECT_TRUE(model.ok()) << model.status();
  auto logits = (*model)->Forward(SequenceRows(fixture.tokens, 0, 0), LogitRows::kAll);
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (kv_bytes) *kv_bytes = (*model)->kv_cache_bytes();
  return *logits;
}

TEST(CompressedCacheTest, LosslessLimitsMatchTheDenseCache) {
  const Fixture fixture = LoadFixture();
  const ModelConfig& config = fixture.loaded.config;
  const std::vector<float> dense = Logits(fixture, nullptr);

  plan::Plan keep_all = EmptyPlan(fixture);
  keep_all.mutable_budgets()->set_scoring(plan::TokenBudgets::KEY_L2_NORM);
  for (int layer = 0; layer < config.num_layers; ++layer) {
    auto* budget = keep_all.mutable_budgets()->add_layers();
    budget->set_layer(layer);
    for (int h = 0; h < config.num_kv_heads; ++h) budget->add_head_keep_fraction(1.0f);
  }
  plan::RefreshSchedule* refresh = keep_all.mutable_refresh();
  refresh->set_small_cache_fraction(1.0f);
  refresh->set_refresh_stride(4);
  for (int layer = 0; layer < config.num_layers; ++layer) refresh->add_layers(layer);
  // Compressed entries are stored in bf16 (what the byte count says and the GPU holds); the fp32 dense cache
  // differs from them by bf16 rounding alone, ~2e-3 of the logits.
  constexpr double kBf16Storage = 4e-3;
  EXPECT_LT(testing::RelativeError(Logits(fixture, &keep_all).data(), dense.data(), dense.size()), kBf16Storage);

  // A basis dictionary with one atom per dimension codes exactly but for fp16 coefficients (and the bf16 of the
  // recent window).
  plan::Plan basis = EmptyPlan(fixture);
  *basis.mutable_sparse_coding() = testing::BasisCoding(config.num_layers, config.head_dim, config.head_dim, 16);
  EXPECT_LT(testing::RelativeError(Logits(fixture, &basis).data(), dense.data(), dense.size()), kBf16Storage);
}

// 8-bit quantization is nearly lossless and 4-bit close; both keep the model's predictions (the bound for each
// width is a few times what the fixture measures: 8 bits ~2e-3, 4 bits ~3e-2 relative error of the logits).
TEST(CompressedCacheTest, QuantizedCachesStayCloseToTheDenseCache) {
  const Fixture fixture = LoadFixture();
  const ModelConfig& config = fixture.loaded.config;
  const std::vector<float> dense = Logits(fixture, nullptr);
  for (const auto& [bits, tolerance] : {std::pair{8, 1e-2}, {4, 1e-1}}) {
    plan::Plan plan = EmptyPlan(fixture);
    *plan.mutable_quantization() = testing::TestQuantization(config.num_layers, config.kv_dim(), bits, 16);
    const std::vector<float> quantized = Logits(fixture, &plan);
    const double error = testing::RelativeError(quantized.data(), dense.data(), dense.size());
    EXPECT_LT(error, tolerance) << bits << " bits";
    EXPECT_GT(error, 1e-5) << bits << " bits: the old entries really are quantized";
  }
}

TEST(CompressedCacheTest, SharedLayersStoreNothing) {
  const Fixture fixture = LoadFixture();
  int64_t dense_bytes = 0, shared_bytes = 0;
  const std::vector<float> dense = Logits(fixture, nullptr, &dense_bytes);
  plan::Plan plan = EmptyPlan(fixture);
  auto* share = plan.mutable_sharing()->add_shares();
  share->set_layer(4);
  share->set_donor(1);
  const std::vector<float> shared = Logits(fixture, &plan, &shared_bytes);
  EXPECT_EQ(shared_bytes * 6, dense_bytes * 5);
  const double difference = testing::RelativeError(shared.data(), dense.data(), dense.size());
  EXPECT_GT(difference, 1e-4);  // layer 4 really attends over layer 1's cache
  EXPECT_LT(difference, 1.0);
}

// Budgets of every size (with and without merging, both scorings), coding with a window wider than the
// budget's, refresh and sharing, alone and together: after a chunked prefill and after decode steps the runtime
// holds exactly the bytes the planner predicts.
TEST(CompressedCacheTest, ResetSequenceForgetsOneSequenceOnly) {
  const Fixture fixture = LoadFixture();
  const ModelConfig& config = fixture.loaded.config;
  const plan::SparseCoding coding = testing::BasisCoding(config.num_layers, config.head_dim, 8, 32);
  const testing::PlanCase cases[] = {
      {"full cache"},
      {"attention budgets+merge", true, true, true, false, false, false},
      {"everything", true, true, true, true, true, true},
  };
  for (const testing::PlanCase& c : cases) {
    const plan::Plan plan = testing::CompileTestPlan(c, fixture.loaded, coding);
    const bool full_cache = std::string(c.name) == "full cache";
    auto make = [&](int num_sequences) -> std::unique_ptr<Model> {
      const CpuModelOptions options{.num_sequences = num_sequences, .capacity = 256};
      auto model = full_cache ? CreateCpuModel(config, *fixture.loaded.weights, options)
                              : CreatePlannedCpuModel(config, *fixture.loaded.weights, plan, options);
      EXPECT_TRUE(model.ok()) << model.status();
      return model.ok() ? std::move(*model) : nullptr;
    };
    // 0: the tested and the reference model run the same arithmetic on the same shapes (reset_sequence_check.h).
    testing::CheckResetSequence(make, fixture.tokens, 0, c.name);
  }
}

TEST(CompressedCacheTest, MeasuredBytesEqualThePlannerEstimate) {
  const Fixture fixture = LoadFixture();
  const ModelConfig& config = fixture.loaded.config;
  const testing::PlanCase cases[] = {
      {"budgets", true, false, false, false, false, false},
      {"budgets+merge", true, true, false, false, false, false},
      {"attention budgets+merge", true, true, true, false, false, false},
      {"coding", false, false, false, true, false, false},
      {"refresh", false, false, false, false, true, false},
      {"share", false, false, false, false, false, true},
      {"budgets+coding", true, true, false, true, false, false},
      {"everything", true, true, true, true, true, true},
      {"quantized 4 bits", false, false, false, false, false, false, 4},
      {"quantized 2 bits + attention budgets + merge + refresh + share", true, true, true, false, true, true, 2},
  };
  // A coding window wider than the budgets' recent window, 8 atoms per vector.
  const plan::SparseCoding coding = testing::BasisCoding(config.num_layers, config.head_dim, 8, 32);
  for (const testing::PlanCase& c : cases) {
    const plan::Plan plan = testing::CompileTestPlan(c, fixture.loaded, coding);
    KVPLAN_ASSERT_OK_AND_ASSIGN(model, CreatePlannedCpuModel(config, *fixture.loaded.weights, plan, {.capacity = 512}));
    const int prompt = int(fixture.tokens.size()) - 8;
    ASSERT_TRUE(model
                    ->Forward(SequenceRows({fixture.tokens.begin(), fixture.tokens.begin() + prompt}, 0, 0),
                              LogitRows::kLastPerSequence)
                    .ok());
    EXPECT_EQ(model->kv_cache_bytes(), PlanCacheBytes(plan, prompt)) << c.name << " after the prefill";
    for (int position = prompt; position < int(fixture.tokens.size()); ++position) {
      KVPLAN_ASSERT_OK_AND_ASSIGN(
          logits, model->Forward(SequenceRows({fixture.tokens[position]}, 0, position), LogitRows::kLastPerSequence));
      for (float value : logits) ASSERT_TRUE(std::isfinite(value)) << c.name;
      EXPECT_EQ(model->kv_cache_bytes(), PlanCacheBytes(plan, position + 1)) << c.name << " at " << position + 1;
    }
    // RefreshKV alone saves no memory: it adds its selection to the full cache.
    if (c.budgets || c.coding || c.share) {
      EXPECT_LT(model->kv_cache_bytes(), FullCacheBytes(plan.model(), int64_t(fixture.tokens.size()))) << c.name;
    }
  }
}

// A one-head cache with value e_t for token t and zero queries (uniform attention): the output is the mean of
// the values of the entries kept, so it shows exactly which tokens survived.
class EvictionTest : public ::testing::Test {
 protected:
  static constexpr int kDim = 16, kTokens = 12;
  ModelConfig Config() const {
    ModelConfig config;
    config.architecture = "LlamaForCausalLM";
    config.num_layers = 1;
    config.num_heads = 1;
    config.num_kv_heads = 1;
    config.head_dim = kDim;
    config.hidden_size = kDim;
    config.rope.theta = 10000;
    return config;
  }
  std::vector<float> Run(const BudgetPolicy& budget, std::vector<float>* output_after_eviction) {
    LayerPolicy policy;
    policy.budget = budget;
    std::unique_ptr<LayerCache> cache = CreateCompressedLayerCache(Config(), 1, kTokens + 1, kTokens, policy, nullptr);
    std::vector<float> keys(kTokens * kDim, 0.0f), values(kTokens * kDim, 0.0f);
    std::vector<int32_t> positions(kTokens);
    for (int t = 0; t < kTokens; ++t) {
      positions[t] = t;
      keys[t * kDim] = float((t * 7) % kTokens + 1);  // key norms: a permutation of 1..12
      values[t * kDim + t] = 1.0f;
    }
    cache->Append(0, positions.data(), kTokens, keys.data(), keys.data(), values.data());
    std::vector<float> q(kTokens * kDim, 0.0f), out(kTokens * kDim);
    cache->Attend(0, positions.data(), kTokens, q.data(), out.data());  // evicts afterwards
    const int32_t next = kTokens;
    std::vector<float> zero(kDim, 0.0f);
    output_after_eviction->assign(kDim, 0.0f);
    cache->Attend(0, &next, 1, zero.data(), output_after_eviction->data());
    return keys;
  }
};

TEST_F(EvictionTest, L2ScoringKeepsTheLowestNormKeys) {
  BudgetPolicy budget{.head_keep_fraction = {0.5f},  // 6 of 12 tokens
                      .recent_window = 2,            // tokens 10 and 11 always stay
                      .sink_tokens = 0,
                      .min_tokens = 0,
                      .merge_evicted = false};
  std::vector<float> output;
  const std::vector<float> keys = Run(budget, &output);
  // Of tokens 0..9, the four with the lowest key norms stay.
  std::vector<std::pair<float, int>> norms;
  for (int t = 0; t < 10; ++t) norms.push_back({keys[t * kDim], t});
  std::sort(norms.begin(), norms.end());
  std::vector<bool> kept(kTokens, false);
  kept[10] = kept[11] = true;
  for (int i = 0; i < 4; ++i) kept[norms[i].second] = true;
  for (int t = 0; t < kTokens; ++t) EXPECT_NEAR(output[t], kept[t] ? 1.0f / 6 : 0.0f, 1e-6) << t;
}

TEST_F(EvictionTest, MergingKeepsTheEvictedMass) {
  BudgetPolicy budget{.head_keep_fraction = {0.5f},
                      .recent_window = 2,
                      .sink_tokens = 0,
                      .min_tokens = 0,
                      .merge_evicted = true,
                      .merge_compensation = 1.0f};
  std::vector<float> output;
  Run(budget, &output);
  // Six tokens kept plus a slot standing for six with logit bias log 6: total weight 12, each token 1/12.
  for (int t = 0; t < kTokens; ++t) EXPECT_NEAR(output[t], 1.0f / 12, 1e-5) << t;
}

TEST(MatchingPursuitTest, BatchedEncoderAgreesWithTheReference) {
  constexpr int kAtoms = 200, kDim = 64, kVectors = 300, kSparsity = 6;
  std::mt19937 generator(5);
  std::normal_distribution<float> normal;
  std::vector<float> dictionary(kAtoms * kDim), x(kVectors * kDim);
  for (float& value : dictionary) value = normal(generator);
  for (int a = 0; a < kAtoms; ++a) {
    float norm = 0;
    for (int d = 0; d < kDim; ++d) norm += dictionary[a * kDim + d] * dictionary[a * kDim + d];
    for (int d = 0; d < kDim; ++d) dictionary[a * kDim + d] /= std::sqrt(norm);
  }
  for (float& value : x) value = normal(generator);
  const SparseCodes batched = MatchingPursuit(dictionary.data(), kAtoms, kDim, x.data(), kVectors, kSparsity);
  EXPECT_TRUE(
      testing::CodesMatchReference(dictionary, kAtoms, kDim, x, kSparsity, batched.indices, batched.coefficients));
}

}  // namespace
}  // namespace kvplan
