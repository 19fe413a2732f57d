// The CPU references of the compressed-cache operations on hand-made entries: which entries eviction, coding and
// RefreshKV selection pick, and where the survivors land. The CUDA kernels are held to these references.
#include <algorithm>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/cpu/compressed/coding.h"
#include "kernels/cpu/compressed/common.h"
#include "kernels/cpu/compressed/eviction.h"
#include "kernels/cpu/compressed/pursuit.h"
#include "kernels/cpu/compressed/scoring.h"
#include "kernels/cpu/elementwise.h"
#include "tests/testing/host_layer.h"

namespace kvplan {
namespace {

using testing::HostLayer;
using testing::HostLayerShape;
using testing::HostStep;

std::vector<int32_t> Sorted(std::vector<int32_t> values) {
  std::sort(values.begin(), values.end());
  return values;
}

// One head of ten dense entries at positions 0..9 with the given scores, stepping at length 10.
HostLayer TenEntries(const std::vector<float>& scores, bool merged = false) {
  HostLayer layer(HostLayerShape{.dense_capacity = 12, .scores = true, .merged = merged});
  std::mt19937 generator(1);
  for (int p = 0; p < 10; ++p) layer.AddDense(0, p, scores[p], generator);
  return layer;
}

std::vector<int32_t> SurvivorsAfterEviction(HostLayer& layer, int kept, const EvictionSettings& settings) {
  HostStep step;
  step.AddSequence(0, 1, 9);
  const std::vector<int32_t> targets = {kept};
  cpu::evict(layer.View(), nullptr, step.View(), StepTargets{.kept = targets.data()}, settings);
  return Sorted(layer.DensePositions(0));
}

// Every channel decodes to within half a step of the vector's range (plus fp16 rounding of scale and minimum),
// the range's ends are hit, and channel scales divide before and multiply after.
TEST(CompressedReferenceTest, QuantizedVectorsDecodeWithinHalfAStep) {
  std::mt19937 generator(3);
  std::normal_distribution<float> normal;
  for (int bits : {2, 4, 8})
    for (bool scaled : {false, true}) {
      const int dim = 64;
      std::vector<float> x(dim), scale(dim), decoded(dim);
      for (int d = 0; d < dim; ++d) {
        scale[d] = 0.25f + float(d % 5);
        x[d] = normal(generator) * (scaled ? scale[d] : 1.0f);
      }
      std::vector<uint32_t> words(QuantizedWords(dim, bits));
      cpu::quantize_vector(x.data(), dim, bits, scaled ? scale.data() : nullptr, words.data());
      cpu::dequantize_vector(words.data(), dim, bits, scaled ? scale.data() : nullptr, decoded.data());
      float low = INFINITY, high = -INFINITY;
      for (int d = 0; d < dim; ++d) {
        const float y = scaled ? x[d] / scale[d] : x[d];
        low = std::min(low, y);
        high = std::max(high, y);
      }
      const float step = (high - low) / float((1 << bits) - 1);
      for (int d = 0; d < dim; ++d) {
        const float unit = scaled ? scale[d] : 1.0f;
        EXPECT_NEAR(decoded[d], x[d], (0.5f * step + 2e-3f * (std::fabs(low) + step)) * unit)
            << bits << " bits, channel " << d;
      }
    }
}

TEST(CompressedReferenceTest, EvictionKeepsSinksRecentAndTheBestScores) {
  const EvictionSettings l2{.keep_low_key_norms = true, .sink_tokens = 1, .protected_recent = 2};
  // Keep 5: sink 0 and recent 8, 9 stay; of 1..7 the two lowest norms (positions 3 and 6) stay.
  HostLayer norms = TenEntries({9, 5, 4, 1, 7, 6, 2, 3, 8, 9});
  EXPECT_EQ(SurvivorsAfterEviction(norms, 5, l2), (std::vector<int32_t>{0, 3, 6, 8, 9}));
  // Attention scores: the most attended (1 and 5) stay.
  EvictionSettings attention = l2;
  attention.keep_low_key_norms = false;
  HostLayer attended = TenEntries({0, 0.9f, 0.1f, 0.2f, 0.3f, 0.8f, 0.1f, 0.1f, 0, 0});
  EXPECT_EQ(SurvivorsAfterEviction(attended, 5, attention), (std::vector<int32_t>{0, 1, 5, 8, 9}));
  // Ties: the older entry goes first.
  HostLayer ties = TenEntries(std::vector<float>(10, 1.0f));
  EXPECT_EQ(SurvivorsAfterEviction(ties, 5, l2), (std::vector<int32_t>{0, 6, 7, 8, 9}));
  // Within budget: nothing.
  HostLayer within = TenEntries({9, 5, 4, 1, 7, 6, 2, 3, 8, 9});
  EXPECT_EQ(SurvivorsAfterEviction(within, 10, l2).size(), 10u);
  // Never past the candidates: a wider protected window (a coding window) keeps 4 newest however small the target.
  HostLayer window = TenEntries(std::vector<float>(10, 1.0f));
  EXPECT_EQ(SurvivorsAfterEviction(window, 1, {.protected_recent = 4}), (std::vector<int32_t>{6, 7, 8, 9}));
}

TEST(CompressedReferenceTest, MergingFoldsVictimsInPositionOrder) {
  HostLayer layer = TenEntries({9, 5, 4, 1, 7, 6, 2, 3, 8, 9}, /*merged=*/true);
  const HostLayer before = layer;
  SurvivorsAfterEviction(layer, 5,
                         {.keep_low_key_norms = true, .sink_tokens = 1, .protected_recent = 2, .merge_evicted = true});
  EXPECT_EQ(layer.merged_tokens[0], 5.0f);
  // The running mean of the victims (positions 1, 2, 4, 5, 7; slots equal positions before eviction).
  std::vector<float> key(16, 0.0f), value(16, 0.0f);
  float tokens = 0;
  for (int p : {1, 2, 4, 5, 7}) {
    std::vector<float> k(16), v(16);
    for (int d = 0; d < 16; ++d) {
      k[d] = Bf16ToFloat(before.dense_keys[p * 16 + d]);
      v[d] = Bf16ToFloat(before.dense_values[p * 16 + d]);
    }
    cpu::merge_into_slot(k.data(), v.data(), 1, 16, key.data(), value.data(), &tokens);
  }
  EXPECT_EQ(layer.merged_keys, key);
  EXPECT_EQ(layer.merged_values, value);
}

TEST(CompressedReferenceTest, CompactionFillsHolesFromTheEnd) {
  const std::vector<uint8_t> removed = {0, 1, 0, 1, 0, 0};
  EXPECT_EQ(cpu::CompactionMoves(removed.data(), 6), (std::vector<std::pair<int, int>>{{4, 1}, {5, 3}}));
  const std::vector<uint8_t> tail = {0, 0, 1, 1};
  EXPECT_TRUE(cpu::CompactionMoves(tail.data(), 4).empty());
  // Survivors keep their data: slots equal positions before, so each slot's key still belongs to its position.
  HostLayer layer = TenEntries({9, 5, 4, 1, 7, 6, 2, 3, 8, 9});
  const HostLayer before = layer;
  SurvivorsAfterEviction(layer, 5, {.keep_low_key_norms = true, .sink_tokens = 1, .protected_recent = 2});
  EXPECT_EQ(layer.DensePositions(0), (std::vector<int32_t>{0, 6, 8, 3, 9}));
  for (int slot = 0; slot < 5; ++slot) {
    const int32_t position = layer.dense_positions[slot];
    for (int d = 0; d < 16; ++d) ASSERT_EQ(layer.dense_keys[slot * 16 + d], before.dense_keys[position * 16 + d]);
  }
}

TEST(CompressedReferenceTest, LeavingEntriesMoveToCodedSlots) {
  HostLayer layer(HostLayerShape{
      .head_dim = 4, .key_sparsity = 2, .value_sparsity = 2, .dense_capacity = 8, .coded_capacity = 8, .scores = true});
  std::mt19937 generator(2);
  for (int p = 0; p < 6; ++p) layer.AddDense(0, p, float(p), generator);
  HostStep step;
  step.AddSequence(0, 2, 5);  // length 6, coding window 3: positions 0..2 leave
  const std::vector<float> basis = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
  const std::vector<float> inv_freq = {1.0f, 0.01f};
  const CodingTables tables{
      .atoms = 4, .key_atoms = basis.data(), .value_atoms = basis.data(), .inv_freq = inv_freq.data()};
  const int max_leaving = 4;
  std::vector<float> keys(max_leaving * 4), values(max_leaving * 4);
  std::vector<int32_t> slots(max_leaving), count(1);
  cpu::gather_leaving_entries(layer.View(), tables, step.View(), 3, max_leaving, keys.data(), values.data(),
                              slots.data(), count.data());
  ASSERT_EQ(count[0], 3);
  EXPECT_EQ(std::vector<int32_t>(slots.begin(), slots.begin() + 3), (std::vector<int32_t>{0, 1, 2}));
  // Keys go back to before RoPE: rotating the gathered key by its position again gives the stored key.
  std::vector<float> rotated(keys.begin() + 4, keys.begin() + 8);
  const int32_t position = 1;
  cpu::apply_rope(rotated.data(), &position, inv_freq.data(), 1, 1, 4, 1.0f);
  for (int d = 0; d < 4; ++d) EXPECT_NEAR(rotated[d], Bf16ToFloat(layer.dense_keys[4 + d]), 1e-6);

  std::vector<uint32_t> codes(max_leaving * 2);
  for (int t = 0; t < 3; ++t) codes[t * 2] = codes[t * 2 + 1] = cpu::pack_code(uint16_t(t), float(t) + 0.5f);
  cpu::commit_leaving_entries(layer.View(), step.View(), max_leaving, slots.data(), count.data(), codes.data(),
                              codes.data());
  EXPECT_EQ(layer.CodedPositions(0), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(layer.coded_scores[2], 2.0f);
  EXPECT_EQ(layer.key_codes[4], cpu::pack_code(2, 2.5f));
  EXPECT_EQ(layer.DensePositions(0), (std::vector<int32_t>{3, 4, 5}));  // the newest three moved into the holes
}

TEST(CompressedReferenceTest, RefreshStepsAndSelection) {
  const int hd = 2;
  // One sequence of one head; its RefreshKV state lives with the layer.
  HostLayer layer(HostLayerShape{.head_dim = hd, .dense_capacity = 8, .selected = true});
  const RefreshStateView state = layer.RefreshView();
  const RefreshSettings settings{.refresh_stride = 3, .query_similarity_threshold = 0.5f, .pool_kernel = 1};
  HostStep step;
  step.AddSequence(0, 1, 7);
  auto decide = [&](std::vector<float> q) {  // one row, one query head
    cpu::refresh_decide(state, step.View(), settings, q.data(), 1, hd);
    return bool(layer.full_step[0]);
  };
  EXPECT_TRUE(decide({1, 0}));  // nothing selected yet
  layer.has_query[0] = 1;
  layer.query[0] = 1.0f;
  layer.query[1] = 0.0f;
  EXPECT_FALSE(decide({1, 0.1f}));
  EXPECT_TRUE(decide({0, 1}));  // the query moved
  layer.steps_since_refresh[0] = 2;
  EXPECT_TRUE(decide({1, 0}));  // the stride is due

  // 8 entries: 2 selected, the most attended.
  std::mt19937 generator(3);
  const std::vector<int32_t> positions = {5, 0, 2, 7, 1, 3, 4, 6};
  const std::vector<float> probabilities = {0.1f, 0.3f, 0.05f, 0.4f, 0.0f, 0.1f, 0.02f, 0.03f};
  for (int32_t p : positions) layer.AddDense(0, p, 0, generator);
  auto select = [&](int pool_kernel) {
    layer.full_step[0] = 1;
    const std::vector<int32_t> selected_count = {2};
    RefreshSettings pooled = settings;
    pooled.pool_kernel = pool_kernel;
    cpu::refresh_select(layer.View(), state, step.View(), StepTargets{.selected = selected_count.data()}, pooled,
                        probabilities.data(), nullptr);
    std::vector<int32_t> chosen;
    for (int e = 0; e < 8; ++e)
      if (layer.dense_selected[e]) chosen.push_back(positions[e]);
    return Sorted(chosen);
  };
  EXPECT_EQ(select(1), (std::vector<int32_t>{0, 7}));
  EXPECT_EQ(layer.refresh_position[0], 8);
  EXPECT_EQ(layer.steps_since_refresh[0], 0);
  EXPECT_EQ(layer.query, layer.step_query);
  // Max-pooling over 3 neighbours spreads position 7's weight to 6: ties go to the newer position.
  EXPECT_EQ(select(3), (std::vector<int32_t>{6, 7}));
  // Not a full step: only the count moves.
  layer.full_step[0] = 0;
  cpu::refresh_select(layer.View(), state, step.View(), StepTargets{}, settings, probabilities.data(), nullptr);
  EXPECT_EQ(layer.steps_since_refresh[0], 1);
}

}  // namespace
}  // namespace kvplan
