// The compressed-cache CUDA kernels against their CPU references (kernels/cpu/compressed/) on random layers of
// several shapes: ragged heads, coded and dense regions, merged slots, RefreshKV subsets, several sequences per
// step. Where a kernel only moves data or makes a decision, storage must match the reference exactly, slot for
// slot; where it computes, per element within the tolerance stated beside the check.
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/cpu/compressed/append.h"
#include "kernels/cpu/compressed/attention.h"
#include "kernels/cpu/compressed/coding.h"
#include "kernels/cpu/compressed/eviction.h"
#include "kernels/cpu/compressed/pursuit.h"
#include "kernels/cpu/compressed/scoring.h"
#include "kernels/cpu/elementwise.h"
#include "runtime/cuda/device_layer.h"
#include "tests/testing/cuda_test_util.h"
#include "tests/testing/host_layer.h"
#include "tests/testing/matching_pursuit_check.h"
#include "tests/testing/tolerance.h"

namespace kvplan {
namespace {

using testing::AllClose;
using testing::Device;
using testing::HostLayer;
using testing::HostLayerShape;
using testing::HostStep;
using testing::RandomVector;
using testing::Tolerance;

// Attention over bf16 dense entries and fp16 codes, bf16 output: the CPU decodes and rotates in another order
// (double sincos against fp32 sincos of a reduced angle) and sums in double, and the quantized reader takes each
// entry's scale and minimum out of its sums (the same terms, associated otherwise); the bf16 output rounding adds
// 2^-8.
constexpr Tolerance kCompressedAttention{.atol = 1.5e-3, .rtol = 1e-2};
// Probabilities from fast-math exp of logits computed in another order.
constexpr Tolerance kProbabilities{.atol = 2e-5, .rtol = 2e-3};
// Rotated values stored as bf16: an fp32 difference in the last bits can flip the rounding by one bf16 step.
constexpr Tolerance kBf16Rotated{.atol = 1e-6, .rtol = 0x1p-7};
// Norms and running means summed in another order.
constexpr Tolerance kFp32Reduction{.atol = 1e-6, .rtol = 2e-5};
// Keys rotated back to before RoPE with the same double angles.
constexpr Tolerance kUnrotated{.atol = 2e-6, .rtol = 2e-5};

// Every array of a HostLayer on the device, and back.
class DeviceLayer {
 public:
  explicit DeviceLayer(const HostLayer& host) : host_(host) {
    const absl::Status status = device_.Upload(host);
    EXPECT_TRUE(status.ok()) << status;
  }
  CompressedLayer View() const { return device_.View(); }
  RefreshStateView RefreshView() const { return device_.RefreshView(); }
  HostLayer Read() const {
    HostLayer host = host_;
    const absl::Status status = device_.Download(host);
    EXPECT_TRUE(status.ok()) << status;
    return host;
  }

 private:
  DeviceCompressedLayer device_;
  HostLayer host_;  // the layer it was made from: shape and regions
};

class DeviceStep {
 public:
  explicit DeviceStep(const HostStep& host)
      : row_sequence_(host.row_sequence),
        row_position_(host.row_position),
        sequence_(host.sequence),
        row_begin_(host.row_begin),
        rows_(int(host.row_sequence.size())),
        sequences_(int(host.sequence.size())) {}
  StepRowsView View() {
    return StepRowsView{rows_, row_sequence_.get(), row_position_.get(), sequences_, sequence_.get(), row_begin_.get()};
  }

 private:
  Device<int32_t> row_sequence_, row_position_, sequence_, row_begin_;
  int rows_, sequences_;
};

// Words [begin, begin + n) of two arrays of 32-bit codes are identical; else the first difference, and for quantized
// vectors (quantized_words > 0 words each) the scale and minimum of both versions of its vector.
::testing::AssertionResult SameWords(const std::vector<uint32_t>& actual, const std::vector<uint32_t>& expected,
                                     size_t begin, size_t n, int quantized_words = 0) {
  for (size_t i = begin; i < begin + n; ++i) {
    if (actual[i] == expected[i]) continue;
    auto result = ::testing::AssertionFailure()
                  << absl::StrFormat("word %d differs: actual %08x expected %08x", i, actual[i], expected[i]);
    if (quantized_words > 0) {
      const size_t first = i / quantized_words * quantized_words;
      auto range = [](uint32_t word) {
        return absl::StrFormat("scale %.9g minimum %.9g", Fp16ToFloat(uint16_t(word & 0xffff)),
                               Fp16ToFloat(uint16_t(word >> 16)));
      };
      result << " (word " << i - first << " of its vector; actual " << range(actual[first]) << ", expected "
             << range(expected[first]) << ")";
    }
    return result;
  }
  return ::testing::AssertionSuccess();
}

// Only the live part of each region is compared: dead slots hold whatever the last move left.
void ExpectSameLiveEntries(const HostLayer& actual, const HostLayer& expected, const std::string& context) {
  const int hd = expected.shape.head_dim, sk = expected.shape.key_sparsity, sv = expected.shape.value_sparsity;
  ASSERT_EQ(actual.dense_count, expected.dense_count) << context;
  ASSERT_EQ(actual.coded_count, expected.coded_count) << context;
  for (int i = 0; i < expected.shape.head_slots; ++i) {
    for (int64_t slot = expected.dense_begin[i]; slot < expected.dense_begin[i] + expected.dense_count[i]; ++slot) {
      ASSERT_EQ(actual.dense_positions[slot], expected.dense_positions[slot]) << context << " dense slot " << slot;
      ASSERT_TRUE(std::equal(expected.dense_keys.begin() + slot * hd, expected.dense_keys.begin() + (slot + 1) * hd,
                             actual.dense_keys.begin() + slot * hd))
          << context << " dense key " << slot;
      ASSERT_TRUE(std::equal(expected.dense_values.begin() + slot * hd, expected.dense_values.begin() + (slot + 1) * hd,
                             actual.dense_values.begin() + slot * hd))
          << context << " dense value " << slot;
      if (expected.shape.scores) {
        ASSERT_EQ(actual.dense_scores[slot], expected.dense_scores[slot]) << context;
      }
      if (expected.shape.selected) {
        ASSERT_EQ(actual.dense_selected[slot], expected.dense_selected[slot]) << context;
      }
    }
    if (sk == 0) continue;
    for (int64_t slot = expected.coded_begin[i]; slot < expected.coded_begin[i] + expected.coded_count[i]; ++slot) {
      ASSERT_EQ(actual.coded_positions[slot], expected.coded_positions[slot]) << context << " coded slot " << slot;
      ASSERT_TRUE(SameWords(actual.key_codes, expected.key_codes, slot * sk, sk)) << context << " key codes " << slot;
      ASSERT_TRUE(SameWords(actual.value_codes, expected.value_codes, slot * sv, sv))
          << context << " value codes " << slot;
      if (expected.shape.scores) {
        ASSERT_EQ(actual.coded_scores[slot], expected.coded_scores[slot]) << context;
      }
      if (expected.shape.selected) {
        ASSERT_EQ(actual.coded_selected[slot], expected.coded_selected[slot]) << context;
      }
    }
  }
}

std::vector<float> UnitRows(int rows, int dim, uint32_t seed) {
  std::vector<float> values = RandomVector(size_t(rows) * dim, seed);
  for (int r = 0; r < rows; ++r) {
    float norm = 0;
    for (int d = 0; d < dim; ++d) norm += values[r * dim + d] * values[r * dim + d];
    for (int d = 0; d < dim; ++d) values[r * dim + d] /= std::sqrt(norm);
  }
  return values;
}

std::vector<float> InverseFrequencies(int head_dim, double theta) {
  std::vector<float> inv_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = float(std::pow(theta, -2.0 * i / head_dim));
  return inv_freq;
}

struct LayerCase {
  int sequences, kv_heads, head_dim, key_sparsity, value_sparsity, atoms;
  bool keys_after_rope;
  int rows_per_sequence;             // rows each stepping sequence brings (1: decode)
  int context;                       // entries already in each head before the step, about
  int key_bits = 0, value_bits = 0;  // > 0: quantized (then the sparsities are QuantizedWords and atoms 0)
  std::string Name() const {
    const std::string coding = key_bits > 0
                                   ? absl::StrFormat("quantized %d+%d bits", key_bits, value_bits)
                                   : absl::StrFormat("codes %d+%d of %d atoms", key_sparsity, value_sparsity, atoms);
    return absl::StrFormat("%d seq x %d kv heads, head_dim %d, %s%s, %d rows, context %d", sequences, kv_heads,
                           head_dim, coding, keys_after_rope ? " (after RoPE)" : "", rows_per_sequence, context);
  }
};
// A quantized layer case: keys after RoPE, as quantized layers code them.
LayerCase QuantizedCase(int sequences, int kv_heads, int head_dim, int key_bits, int value_bits, int rows_per_sequence,
                        int context) {
  return {sequences,
          kv_heads,
          head_dim,
          QuantizedWords(head_dim, key_bits),
          QuantizedWords(head_dim, value_bits),
          0,
          true,
          rows_per_sequence,
          context,
          key_bits,
          value_bits};
}

// A layer whose heads hold ragged numbers of entries: positions 0..length-1 of each sequence split between the
// coded region (the older ones) and the dense region, some dropped as if evicted, slots shuffled; random scores
// (distinct, so selections have no ties), selection flags and merged slots. Sequence s has length lengths[s].
struct RandomLayer {
  HostLayer host;
  std::vector<int32_t> lengths;
  std::vector<float> key_atoms, value_atoms, inv_freq;
  std::vector<float> key_channel_scale;  // [kv_heads, head_dim]; quantized cases
  CodingTables Tables() const {
    return CodingTables{.atoms = c.atoms,
                        .key_atoms = key_atoms.data(),
                        .value_atoms = value_atoms.data(),
                        .key_bits = c.key_bits,
                        .value_bits = c.value_bits,
                        .key_channel_scale = key_channel_scale.empty() ? nullptr : key_channel_scale.data(),
                        .keys_after_rope = c.keys_after_rope,
                        .inv_freq = inv_freq.data(),
                        .rope_attention_factor = 1.0f};
  }
  LayerCase c;
};

// A quantized case's coded entries: random keys and values quantized by the CPU reference, against random key
// channel scales in [0.5, 2).
void QuantizeCodedEntries(RandomLayer& layer, std::mt19937& generator) {
  const LayerCase& c = layer.c;
  const int hd = c.head_dim, sk = c.key_sparsity, sv = c.value_sparsity;
  std::uniform_real_distribution<float> uniform(0.5f, 2.0f);
  std::normal_distribution<float> normal;
  layer.key_channel_scale.resize(size_t(c.kv_heads) * hd);
  for (float& scale : layer.key_channel_scale) scale = uniform(generator);
  std::vector<float> key(hd), value(hd);
  HostLayer& host = layer.host;
  for (int i = 0; i < c.sequences * c.kv_heads; ++i)
    for (int64_t slot = host.coded_begin[i]; slot < host.coded_begin[i] + host.coded_count[i]; ++slot) {
      for (int d = 0; d < hd; ++d) {
        key[d] = 1.5f * normal(generator);
        value[d] = normal(generator);
      }
      cpu::quantize_vector(key.data(), hd, c.key_bits, layer.key_channel_scale.data() + int64_t(i % c.kv_heads) * hd,
                           host.key_codes.data() + slot * sk);
      cpu::quantize_vector(value.data(), hd, c.value_bits, nullptr, host.value_codes.data() + slot * sv);
    }
}

RandomLayer MakeRandomLayer(const LayerCase& c, uint32_t seed) {
  std::mt19937 generator(seed);
  const bool coded = c.key_sparsity > 0;
  // Room for the longest sequence (context + 16), the step's rows, and entries coded during the step.
  const int dense_capacity = (coded ? 40 : c.context + 16) + c.rows_per_sequence + 8;
  RandomLayer layer{HostLayer(HostLayerShape{.head_slots = c.sequences * c.kv_heads,
                                             .kv_heads = c.kv_heads,
                                             .head_dim = c.head_dim,
                                             .key_sparsity = c.key_sparsity,
                                             .value_sparsity = c.value_sparsity,
                                             .dense_capacity = dense_capacity,
                                             .coded_capacity = coded ? c.context + 16 + c.rows_per_sequence + 8 : 0,
                                             .scores = true,
                                             .selected = true,
                                             .merged = true}),
                    {},
                    UnitRows(std::max(c.atoms, 1), c.head_dim, seed + 1),
                    UnitRows(std::max(c.atoms, 1), c.head_dim, seed + 2),
                    InverseFrequencies(c.head_dim, 10000.0),
                    {},
                    c};
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int s = 0; s < c.sequences; ++s) {
    const int length = c.context + int(generator() % 17);
    layer.lengths.push_back(length);
    for (int h = 0; h < c.kv_heads; ++h) {
      const int i = s * c.kv_heads + h;
      std::vector<int32_t> kept;
      for (int p = 0; p < length; ++p)
        if (p >= length - 24 || uniform(generator) < 0.85f) kept.push_back(p);  // ragged: some evicted
      const int dense_part = coded ? std::min<int>(int(kept.size()), 24 + int(generator() % 8)) : int(kept.size());
      const int coded_part = int(kept.size()) - dense_part;
      std::vector<int32_t> older(kept.begin(), kept.begin() + coded_part), newer(kept.begin() + coded_part, kept.end());
      std::shuffle(older.begin(), older.end(), generator);
      std::shuffle(newer.begin(), newer.end(), generator);
      for (int32_t p : older) layer.host.AddCoded(i, p, uniform(generator), std::max(c.atoms, 1), generator);
      for (int32_t p : newer) layer.host.AddDense(i, p, uniform(generator), generator);
      if (i % 3 != 1) {  // most heads have a merged slot
        layer.host.merged_tokens[i] = float(1 + generator() % 9);
        for (int d = 0; d < c.head_dim; ++d) {
          layer.host.merged_keys[int64_t(i) * c.head_dim + d] = uniform(generator) - 0.5f;
          layer.host.merged_values[int64_t(i) * c.head_dim + d] = uniform(generator) - 0.5f;
        }
      }
    }
  }
  for (auto& flag : layer.host.dense_selected) flag = uniform(generator) < 0.3f;
  for (auto& flag : layer.host.coded_selected) flag = uniform(generator) < 0.3f;
  if (c.key_bits > 0) QuantizeCodedEntries(layer, generator);
  return layer;
}

// A RandomLayer's coding tables with their arrays on the device.
class DeviceTables {
 public:
  explicit DeviceTables(const RandomLayer& layer)
      : key_atoms_(layer.key_atoms),
        value_atoms_(layer.value_atoms),
        inv_freq_(layer.inv_freq),
        key_channel_scale_(layer.key_channel_scale),
        tables_(layer.Tables()) {
    tables_.key_atoms = key_atoms_.get();
    tables_.value_atoms = value_atoms_.get();
    tables_.inv_freq = inv_freq_.get();
    if (tables_.key_channel_scale != nullptr) tables_.key_channel_scale = key_channel_scale_.get();
  }
  const CodingTables& get() const { return tables_; }
  const float* key_channel_scale() const { return tables_.key_channel_scale; }

 private:
  Device<float> key_atoms_, value_atoms_, inv_freq_, key_channel_scale_;
  CodingTables tables_;
};

// Every sequence but the second steps, each with rows_per_sequence rows continuing its length.
HostStep MakeStep(const RandomLayer& layer) {
  HostStep step;
  for (int s = 0; s < layer.c.sequences; ++s)
    if (s != 1) step.AddSequence(s, layer.c.rows_per_sequence, layer.lengths[s] + layer.c.rows_per_sequence - 1);
  return step;
}

// Appends the step's rows to both copies: the references need the new rows present before attention.
void AppendStepRows(RandomLayer& layer, const HostStep& step, uint32_t seed) {
  std::mt19937 generator(seed);
  for (int j = 0; j < int(step.sequence.size()); ++j)
    for (int r = step.row_begin[j]; r < step.row_begin[j + 1]; ++r)
      for (int h = 0; h < layer.c.kv_heads; ++h)
        layer.host.AddDense(step.sequence[j] * layer.c.kv_heads + h, step.row_position[r], 0.5f, generator);
}

const LayerCase kLayerCases[] = {
    {3, 2, 64, 8, 8, 64, false, 1, 150},
    {3, 2, 64, 8, 8, 64, true, 1, 150},
    {2, 8, 128, 8, 4, 1024, false, 1, 300},
    {4, 1, 64, 0, 0, 0, false, 1, 90},
    {3, 2, 64, 4, 4, 37, false, 17, 120},
    {2, 4, 128, 0, 0, 0, false, 5, 260},
    {3, 1, 256, 16, 16, 300, false, 1, 70},
    // Quantized: odd widths of keys and values, every head_dim, decode and prefill-sized steps.
    QuantizedCase(3, 2, 64, 4, 2, 1, 150),
    QuantizedCase(2, 4, 128, 8, 8, 5, 260),
    QuantizedCase(3, 1, 256, 2, 4, 17, 120),
};

TEST(CudaCompressedTest, AppendMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (const LayerCase& c : kLayerCases) {
    RandomLayer layer = MakeRandomLayer(c, 11);
    const HostStep step = MakeStep(layer);
    const int rows = int(step.row_sequence.size()), kv = c.kv_heads * c.head_dim;
    const std::vector<float> keys = RandomVector(size_t(rows) * kv, 12, 2.0f), values = RandomVector(keys.size(), 13);
    DeviceLayer device(layer.host);
    DeviceStep device_step(step);
    Device<float> d_keys(keys), d_values(values), d_freq(layer.inv_freq);
    ASSERT_EQ(cuda::compressed_append(device.View(), device_step.View(), d_keys.get(), d_values.get(), d_freq.get(),
                                      1.0f, true, nullptr),
              cudaSuccess);
    std::vector<float> rotated = keys, norms(size_t(rows) * c.kv_heads);
    cpu::key_l2_norms(keys.data(), int64_t(norms.size()), c.head_dim, norms.data());
    cpu::apply_rope(rotated.data(), step.row_position.data(), layer.inv_freq.data(), rows, c.kv_heads, c.head_dim,
                    1.0f);
    cpu::compressed_append(layer.host.View(), step.View(), rotated.data(), values.data(), norms.data());
    const HostLayer actual = device.Read();
    ASSERT_EQ(actual.dense_count, layer.host.dense_count) << c.Name();
    ASSERT_EQ(actual.dense_positions, layer.host.dense_positions) << c.Name();
    ASSERT_EQ(actual.dense_values, layer.host.dense_values) << c.Name();
    std::vector<float> actual_keys, expected_keys;
    for (uint16_t bits : actual.dense_keys) actual_keys.push_back(Bf16ToFloat(bits));
    for (uint16_t bits : layer.host.dense_keys) expected_keys.push_back(Bf16ToFloat(bits));
    EXPECT_TRUE(AllClose(actual_keys, expected_keys, kBf16Rotated)) << c.Name();
    EXPECT_TRUE(AllClose(actual.dense_scores, layer.host.dense_scores, kFp32Reduction)) << c.Name();
  }
}

// Attention cases, each at several GQA groups: every layer case at groups 1 and 4, then cases for the attention's
// paths. Keys coded after RoPE take the table path (1024 and 4096 atoms; at 4096 atoms and group 8 its shared memory
// does not fit and the general kernel runs) over contexts past 4096 that use several splits, and in steps of 17 rows
// per sequence (more rows than one table launch takes); budget-only layers keep thousands of dense entries, and
// quantized layers thousands of coded ones, on the split path too; a sparsity that is no multiple of 4 falls back to
// the general kernel.
std::vector<std::pair<LayerCase, std::vector<int>>> AttentionCases() {
  std::vector<std::pair<LayerCase, std::vector<int>>> cases;
  for (const LayerCase& c : kLayerCases) cases.push_back({c, {1, 4}});
  const LayerCase path_cases[] = {
      {3, 2, 128, 8, 8, 1024, true, 1, 4500}, {3, 1, 128, 8, 8, 4096, true, 1, 5000},
      {3, 2, 128, 8, 4, 1024, true, 17, 700}, {3, 1, 256, 16, 12, 300, true, 1, 2100},
      {3, 2, 128, 0, 0, 0, false, 1, 6000},   {3, 2, 64, 0, 0, 0, false, 17, 1500},
      {3, 2, 64, 6, 6, 200, true, 1, 300},    QuantizedCase(3, 2, 128, 4, 4, 1, 2100),
  };
  for (const LayerCase& c : path_cases) cases.push_back({c, {2, 4, 8}});
  return cases;
}

// Attention and probabilities, with RefreshKV full steps for some sequences and subsets for the others.
TEST(CudaCompressedTest, AttentionAndProbabilitiesMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (const auto& [c, groups] : AttentionCases()) {
    for (const int group : groups) {
      RandomLayer layer = MakeRandomLayer(c, 21 + group);
      const HostStep step = MakeStep(layer);
      AppendStepRows(layer, step, 22);
      const int rows = int(step.row_sequence.size()), heads = c.kv_heads * group;
      const std::vector<float> q = RandomVector(size_t(rows) * heads * c.head_dim, 23, 1.5f);
      // Refresh state: sequence 0 on a full step, the others on subsets past a refresh position.
      HostLayer& host = layer.host;
      for (int s = 0; s < c.sequences; ++s) {
        host.refresh_position[s] = layer.lengths[s] - 5;
        host.steps_since_refresh[s] = 1;
        host.has_query[s] = 1;
      }
      host.full_step[0] = 1;
      const RefreshStateView host_refresh = host.RefreshView();
      const cpu::CompressedAttentionParams params{
          .heads = heads, .scale = 1.0f / std::sqrt(float(c.head_dim)), .merge_compensation = 0.7f};
      const CodingTables tables = layer.Tables();
      std::vector<float> expected(q.size()), dense_probabilities(layer.host.dense_positions.size(), -1.0f),
          coded_probabilities(layer.host.coded_positions.size(), -1.0f);
      cpu::compressed_attention(layer.host.View(), &tables, step.View(), &host_refresh, params, q.data(),
                                expected.data(), dense_probabilities.data(), coded_probabilities.data());

      DeviceLayer device(layer.host);
      DeviceStep device_step(step);
      Device<float> d_q(q);
      const DeviceTables device_tables(layer);
      const RefreshStateView device_refresh = device.RefreshView();
      const int max_region = (layer.host.dense_begin[1] - layer.host.dense_begin[0]) +
                             (layer.host.coded_begin[1] - layer.host.coded_begin[0]) + 1;
      const cuda::CompressedAttentionShape shape{.heads = heads,
                                                 .scale = params.scale,
                                                 .merge_compensation = params.merge_compensation,
                                                 .max_region = max_region};
      Device<uint16_t> out(q.size());
      Device<float> row_stats(size_t(rows) * heads * 2);
      const cuda::DeviceLimits limits = cuda::device_limits();
      Device<char> workspace(cuda::compressed_attention_workspace_bytes(shape, rows, c.kv_heads, c.head_dim,
                                                                        c.key_sparsity ? c.atoms : 0, limits));
      const cuda::CompressedAttentionPlan plan =
          cuda::plan_compressed_attention(device.View(), &device_tables.get(), shape, rows, limits);
      Device<float> d_dense_probabilities(dense_probabilities.size()),
          d_coded_probabilities(coded_probabilities.size());
      ASSERT_EQ(
          cuda::compressed_attention(device.View(), &device_tables.get(), device_step.View(), &device_refresh, shape,
                                     plan, d_q.get(), testing::AsBf16(out), row_stats.get(), workspace.get(), nullptr),
          cudaSuccess);
      ASSERT_EQ(cuda::entry_probabilities(device.View(), &device_tables.get(), device_step.View(), &device_refresh,
                                          shape, d_q.get(), row_stats.get(), false, d_dense_probabilities.get(),
                                          d_coded_probabilities.get(), nullptr),
                cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::string name = absl::StrFormat("%s, group %d", c.Name(), group);
      EXPECT_TRUE(AllClose(testing::ReadBf16(out), expected, kCompressedAttention)) << name;
      // Probabilities of the stepping heads' live entries (the reference leaves the rest at -1).
      const std::vector<float> actual_dense = d_dense_probabilities.Read(), actual_coded = d_coded_probabilities.Read();
      std::vector<float> live_actual, live_expected;
      auto collect = [&](const std::vector<float>& expected_values, const std::vector<float>& actual_values) {
        for (size_t slot = 0; slot < expected_values.size(); ++slot) {
          if (expected_values[slot] < 0.0f) continue;
          live_actual.push_back(actual_values[slot]);
          live_expected.push_back(expected_values[slot]);
        }
      };
      collect(dense_probabilities, actual_dense);
      collect(coded_probabilities, actual_coded);
      EXPECT_GT(live_expected.size(), 0u);
      EXPECT_TRUE(AllClose(live_actual, live_expected, kProbabilities)) << name;
    }
  }
}

TEST(CudaCompressedTest, ScoresAndRefreshMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (const LayerCase& c : kLayerCases) {
    RandomLayer layer = MakeRandomLayer(c, 31);
    const HostStep step = MakeStep(layer);
    AppendStepRows(layer, step, 32);
    std::mt19937 generator(33);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    std::vector<float> dense_probabilities(layer.host.dense_positions.size()),
        coded_probabilities(layer.host.coded_positions.size());
    for (float& p : dense_probabilities) p = uniform(generator) * 0.1f;
    for (float& p : coded_probabilities) p = uniform(generator) * 0.1f;
    // The refresh state the decide below starts from (the device copy takes it with the layer): sequence 0 has no
    // query yet, 2 is due by stride, 3 drifted, the rest stay on subsets.
    const int heads = 2 * c.kv_heads, rows = int(step.row_sequence.size());
    std::vector<float> q = RandomVector(size_t(rows) * heads * c.head_dim, 34);
    HostLayer& host = layer.host;
    std::fill(host.refresh_position.begin(), host.refresh_position.end(), 3);
    std::fill(host.has_query.begin(), host.has_query.end(), 1);
    host.has_query[0] = 0;
    if (c.sequences > 2) host.steps_since_refresh[2] = 7;
    // The last full step's query: this step's mean query (no drift), reversed for sequence 3 (drift).
    for (int j = 0; j < int(step.sequence.size()); ++j) {
      const int s = step.sequence[j];
      const float* last = q.data() + size_t(step.row_begin[j + 1] - 1) * heads * c.head_dim;
      for (int d = 0; d < c.head_dim; ++d) {
        float mean = 0.0f;
        for (int h = 0; h < heads; ++h) mean += last[h * c.head_dim + d] / heads;
        host.query[size_t(s) * c.head_dim + d] = s == 3 ? -mean : mean;
      }
    }

    DeviceLayer device(host);
    DeviceStep device_step(step);
    Device<float> d_dense(dense_probabilities), d_coded(coded_probabilities);
    cpu::update_scores(host.View(), step.View(), 0.9f, dense_probabilities.data(), coded_probabilities.data());
    ASSERT_EQ(cuda::update_scores(device.View(), device_step.View(), 0.9f, d_dense.get(), d_coded.get(), nullptr),
              cudaSuccess);
    ExpectSameLiveEntries(device.Read(), host, "update_scores " + c.Name());

    const RefreshSettings settings{.refresh_stride = 8, .query_similarity_threshold = 0.85f, .pool_kernel = 5};
    Device<float> d_q(q);
    cpu::refresh_decide(host.RefreshView(), step.View(), settings, q.data(), heads, c.head_dim);
    ASSERT_EQ(
        cuda::refresh_decide(device.RefreshView(), device_step.View(), settings, d_q.get(), heads, c.head_dim, nullptr),
        cudaSuccess);
    const HostLayer decided = device.Read();
    ASSERT_EQ(decided.full_step, host.full_step) << c.Name();
    EXPECT_TRUE(AllClose(decided.step_query, host.step_query, kFp32Reduction)) << c.Name();
    EXPECT_EQ(host.full_step[0], 1);

    // Select: each head keeps a third of its entries.
    std::vector<int32_t> selected_counts;
    for (int j = 0; j < int(step.sequence.size()); ++j)
      for (int h = 0; h < c.kv_heads; ++h) {
        const int i = step.sequence[j] * c.kv_heads + h;
        selected_counts.push_back((host.dense_count[i] + (c.key_sparsity ? host.coded_count[i] : 0)) / 3);
      }
    Device<int32_t> d_selected_counts(selected_counts);
    const int capacity = *std::max_element(layer.lengths.begin(), layer.lengths.end()) + c.rows_per_sequence;
    Device<float> position_workspace(
        cuda::refresh_select_workspace_bytes(int(step.sequence.size()), c.kv_heads, capacity) / sizeof(float));
    cpu::refresh_select(host.View(), host.RefreshView(), step.View(), {.selected = selected_counts.data()}, settings,
                        dense_probabilities.data(), coded_probabilities.data());
    ASSERT_EQ(cuda::refresh_select(device.View(), device.RefreshView(), device_step.View(),
                                   {.selected = d_selected_counts.get()}, settings, d_dense.get(), d_coded.get(),
                                   capacity, position_workspace.get(), nullptr),
              cudaSuccess);
    const HostLayer selected = device.Read();
    ExpectSameLiveEntries(selected, host, "refresh_select " + c.Name());
    EXPECT_EQ(selected.refresh_position, host.refresh_position) << c.Name();
    EXPECT_EQ(selected.steps_since_refresh, host.steps_since_refresh) << c.Name();
    EXPECT_EQ(selected.has_query, host.has_query) << c.Name();
  }
}

TEST(CudaCompressedTest, EvictionMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (const LayerCase& c : kLayerCases) {
    for (const bool keep_low_key_norms : {true, false}) {
      for (const bool merge : {true, false}) {
        RandomLayer layer = MakeRandomLayer(c, 41 + merge);
        const HostStep step = MakeStep(layer);
        AppendStepRows(layer, step, 42);
        // Targets from a few entries under what each head holds to a good share of it.
        std::vector<int32_t> kept;
        for (int j = 0; j < int(step.sequence.size()); ++j)
          for (int h = 0; h < c.kv_heads; ++h) {
            const int i = step.sequence[j] * c.kv_heads + h;
            const int live = layer.host.dense_count[i] + (c.key_sparsity ? layer.host.coded_count[i] : 0);
            kept.push_back(h % 2 == 0 ? live - std::min(live, c.rows_per_sequence + 1) : live * 2 / 3);
          }
        const EvictionSettings settings{
            .keep_low_key_norms = keep_low_key_norms, .sink_tokens = 4, .protected_recent = 8, .merge_evicted = merge};
        DeviceLayer device(layer.host);
        DeviceStep device_step(step);
        Device<int32_t> d_kept(kept);
        const CodingTables tables = layer.Tables();
        const DeviceTables device_tables(layer);
        // The first case's targets are small enough that some heads could lose more than one step allows.
        bool fits = true;
        for (int j = 0; j < int(step.sequence.size()); ++j)
          for (int h = 0; h < c.kv_heads; ++h) {
            const int i = step.sequence[j] * c.kv_heads + h;
            const int live = layer.host.dense_count[i] + (c.key_sparsity ? layer.host.coded_count[i] : 0);
            fits &= live - kept[j * c.kv_heads + h] <= cuda::kMaxEvictionsPerStep;
          }
        ASSERT_TRUE(fits) << "test targets exceed one step's evictions";
        cpu::evict(layer.host.View(), &tables, step.View(), {.kept = kept.data()}, settings);
        ASSERT_EQ(cuda::evict(device.View(), &device_tables.get(), device_step.View(), {.kept = d_kept.get()}, settings,
                              nullptr),
                  cudaSuccess);
        const HostLayer actual = device.Read();
        const std::string name =
            absl::StrFormat("%s, %s, merge %d", c.Name(), keep_low_key_norms ? "L2" : "attention", merge);
        ExpectSameLiveEntries(actual, layer.host, name);
        EXPECT_EQ(actual.merged_tokens, layer.host.merged_tokens) << name;
        EXPECT_TRUE(AllClose(actual.merged_keys, layer.host.merged_keys, kFp32Reduction)) << name;
        EXPECT_TRUE(AllClose(actual.merged_values, layer.host.merged_values, kFp32Reduction)) << name;
      }
    }
  }
}

TEST(CudaCompressedTest, CodingLeavingEntriesMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (const LayerCase& c : kLayerCases) {
    if (c.key_sparsity == 0) continue;
    RandomLayer layer = MakeRandomLayer(c, 51);
    const HostStep step = MakeStep(layer);
    AppendStepRows(layer, step, 52);
    const int window = 20, max_leaving = 40 + c.rows_per_sequence;
    const int groups = int(step.sequence.size()) * c.kv_heads, hd = c.head_dim;
    std::vector<float> keys(size_t(groups) * max_leaving * hd), values(keys.size());
    std::vector<int32_t> slots(size_t(groups) * max_leaving), counts(groups);
    const CodingTables tables = layer.Tables();
    cpu::gather_leaving_entries(layer.host.View(), tables, step.View(), window, max_leaving, keys.data(), values.data(),
                                slots.data(), counts.data());
    DeviceLayer device(layer.host);
    DeviceStep device_step(step);
    const DeviceTables device_tables(layer);
    Device<float> d_keys(keys.size()), d_values(values.size());
    Device<int32_t> d_slots(slots.size()), d_counts(counts.size());
    ASSERT_EQ(cuda::gather_leaving_entries(device.View(), device_tables.get(), device_step.View(), window, max_leaving,
                                           d_keys.get(), d_values.get(), d_slots.get(), d_counts.get(), nullptr),
              cudaSuccess);
    ASSERT_EQ(d_counts.Read(), counts) << c.Name();
    const std::vector<int32_t> actual_slots = d_slots.Read();
    const std::vector<float> actual_keys = d_keys.Read(), actual_values = d_values.Read();
    std::vector<float> live_keys, expected_keys, live_values, expected_values;
    for (int g = 0; g < groups; ++g)
      for (int t = 0; t < counts[g]; ++t) {
        const size_t row = size_t(g) * max_leaving + t;
        ASSERT_EQ(actual_slots[row], slots[row]) << c.Name();
        live_keys.insert(live_keys.end(), actual_keys.begin() + row * hd, actual_keys.begin() + (row + 1) * hd);
        expected_keys.insert(expected_keys.end(), keys.begin() + row * hd, keys.begin() + (row + 1) * hd);
        live_values.insert(live_values.end(), actual_values.begin() + row * hd, actual_values.begin() + (row + 1) * hd);
        expected_values.insert(expected_values.end(), values.begin() + row * hd, values.begin() + (row + 1) * hd);
      }
    ASSERT_GT(live_keys.size(), 0u) << c.Name();
    EXPECT_TRUE(AllClose(live_keys, expected_keys, kUnrotated)) << c.Name();
    EXPECT_EQ(live_values, expected_values) << c.Name();

    // Dictionary codes: both commits take the CPU's codes. Quantized layers: each backend quantizes its own gathered
    // rows (identical, keys being gathered after RoPE as they are stored) as CodeLeaving does, and the words must be
    // identical. Either way the storage must come out identical.
    const size_t rows = size_t(groups) * max_leaving;
    std::vector<uint32_t> key_codes(rows * c.key_sparsity), value_codes(rows * c.value_sparsity);
    Device<uint32_t> d_key_codes(key_codes.size()), d_value_codes(value_codes.size());
    if (c.key_bits > 0) {
      for (int g = 0; g < groups; ++g)
        for (int t = 0; t < counts[g]; ++t) {
          const size_t row = size_t(g) * max_leaving + t;
          cpu::quantize_vector(keys.data() + row * hd, hd, c.key_bits,
                               layer.key_channel_scale.data() + (g % c.kv_heads) * hd,
                               key_codes.data() + row * c.key_sparsity);
          cpu::quantize_vector(values.data() + row * hd, hd, c.value_bits, nullptr,
                               value_codes.data() + row * c.value_sparsity);
        }
      const cuda::QuantizeJob jobs[] = {
          {d_keys.get(), c.key_bits, device_tables.key_channel_scale(), d_key_codes.get()},
          {d_values.get(), c.value_bits, nullptr, d_value_codes.get()}};
      ASSERT_EQ(cuda::quantize_vectors(jobs, 2, hd, c.kv_heads, groups, max_leaving, d_counts.get(), nullptr),
                cudaSuccess);
      const std::vector<uint32_t> actual_key_codes = d_key_codes.Read(), actual_value_codes = d_value_codes.Read();
      for (int g = 0; g < groups; ++g)
        for (int t = 0; t < counts[g]; ++t) {
          const size_t row = size_t(g) * max_leaving + t;
          ASSERT_TRUE(SameWords(actual_key_codes, key_codes, row * c.key_sparsity, c.key_sparsity, c.key_sparsity))
              << c.Name() << ", key of group " << g << " row " << t;
          ASSERT_TRUE(
              SameWords(actual_value_codes, value_codes, row * c.value_sparsity, c.value_sparsity, c.value_sparsity))
              << c.Name() << ", value of group " << g << " row " << t;
        }
    } else {
      for (size_t i = 0; i < key_codes.size(); ++i)
        key_codes[i] = cpu::pack_code(uint16_t(i % c.atoms), 0.25f * (i % 7));
      for (size_t i = 0; i < value_codes.size(); ++i) value_codes[i] = cpu::pack_code(uint16_t(i % c.atoms), -0.5f);
      ASSERT_EQ(cudaMemcpy(d_key_codes.get(), key_codes.data(), key_codes.size() * 4, cudaMemcpyHostToDevice),
                cudaSuccess);
      ASSERT_EQ(cudaMemcpy(d_value_codes.get(), value_codes.data(), value_codes.size() * 4, cudaMemcpyHostToDevice),
                cudaSuccess);
    }
    cpu::commit_leaving_entries(layer.host.View(), step.View(), max_leaving, slots.data(), counts.data(),
                                key_codes.data(), value_codes.data());
    ASSERT_EQ(cuda::commit_leaving_entries(device.View(), device_step.View(), max_leaving, d_slots.get(),
                                           d_counts.get(), d_key_codes.get(), d_value_codes.get(), nullptr),
              cudaSuccess);
    ExpectSameLiveEntries(device.Read(), layer.host, "commit " + c.Name());
  }
}

// Keys and values quantized in one launch, as a layer codes them: every width and head_dim, with and without key
// channel scales, odd group sizes and counts (uncounted rows stay untouched), and rows at the format's edges. The
// words must be the CPU reference's, bit for bit.
TEST(CudaCompressedTest, QuantizeVectorsMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const int kv_heads = 3, groups = 5, group_size = 7;
  const std::vector<int32_t> counts = {7, 3, 0, 5, 1};
  Device<int32_t> d_counts(counts);
  const size_t vectors = size_t(groups) * group_size;
  for (const int dim : {64, 128, 256})
    for (const int bits : {2, 4, 8})
      for (const bool scaled : {true, false}) {
        const int value_bits = bits == 8 ? 2 : 2 * bits;
        std::vector<float> keys = RandomVector(vectors * dim, 61 + bits, 1.5f), values = RandomVector(keys.size(), 62);
        const std::vector<float> scales = RandomVector(size_t(kv_heads) * dim, 63);
        std::vector<float> channel_scale;
        for (float s : scales) channel_scale.push_back(0.5f + std::fabs(s));
        // Group 0's first rows: constant (scale 0); signed zeros at the low end of the range; beyond fp16's range
        // (saturated minimum and scale); a range so narrow that the scale is an fp16 subnormal.
        for (std::vector<float>* x : {&keys, &values})
          for (int d = 0; d < dim; ++d) {
            (*x)[d] = 0.75f;
            (*x)[dim + d] = d % 5 == 0 ? (d % 2 == 0 ? -0.0f : 0.0f) : std::fabs((*x)[dim + d]);
            (*x)[2 * dim + d] *= 1e5f;
            (*x)[3 * dim + d] = 1.0f + 1e-5f * (*x)[3 * dim + d];
          }
        const int key_words = QuantizedWords(dim, bits), value_words = QuantizedWords(dim, value_bits);
        Device<float> d_keys(keys), d_values(values), d_scale(channel_scale);
        Device<uint32_t> d_key_words(vectors * key_words), d_value_words(vectors * value_words);
        const cuda::QuantizeJob jobs[] = {{d_keys.get(), bits, scaled ? d_scale.get() : nullptr, d_key_words.get()},
                                          {d_values.get(), value_bits, nullptr, d_value_words.get()}};
        ASSERT_EQ(cuda::quantize_vectors(jobs, 2, dim, kv_heads, groups, group_size, d_counts.get(), nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<uint32_t> actual_keys = d_key_words.Read(), actual_values = d_value_words.Read();
        std::vector<uint32_t> expected_keys(actual_keys.size(), 0xffffffffu),
            expected_values(actual_values.size(), 0xffffffffu);
        for (size_t v = 0; v < vectors; ++v) {
          if (int(v % group_size) >= counts[v / group_size]) continue;
          const float* scale = scaled ? channel_scale.data() + (v / group_size % kv_heads) * dim : nullptr;
          cpu::quantize_vector(keys.data() + v * dim, dim, bits, scale, expected_keys.data() + v * key_words);
          cpu::quantize_vector(values.data() + v * dim, dim, value_bits, nullptr,
                               expected_values.data() + v * value_words);
        }
        const std::string name =
            absl::StrFormat("dim %d, %d/%d bits%s", dim, bits, value_bits, scaled ? ", key channel scales" : "");
        EXPECT_TRUE(SameWords(actual_keys, expected_keys, 0, expected_keys.size(), key_words)) << name << ", keys";
        EXPECT_TRUE(SameWords(actual_values, expected_values, 0, expected_values.size(), value_words))
            << name << ", values";
      }
}

// Two pursuits of one shape in one launch, as a layer codes its keys and values: different dictionaries, vectors
// and sparsities.
TEST(CudaCompressedTest, MatchingPursuitMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [atoms, dim, groups, group_size, sparsity] :
       {std::tuple{1024, 64, 3, 91, 8},
        {37, 128, 5, 20, 4},
        {5, 64, 2, 5, 5},
        {4096, 128, 2, 40, 8},
        // A decode step's few vectors, each spread over a cluster: 16 blocks of 64 atoms, of 256 atoms, of 188
        // (the last block short).
        {1024, 128, 8, 1, 8},
        {4096, 128, 8, 1, 8},
        {3000, 64, 4, 3, 7}}) {
    std::vector<int32_t> counts(groups);
    for (int g = 0; g < groups; ++g) counts[g] = group_size - g * 3;  // rows past a count stay untouched
    Device<int32_t> d_counts(counts);
    const size_t vectors = size_t(groups) * group_size;
    const int sparsities[] = {sparsity, std::max(1, sparsity - 2)};
    std::vector<std::vector<float>> dictionaries, xs;
    std::vector<std::unique_ptr<Device<float>>> d_dictionaries, d_xs;
    std::vector<std::unique_ptr<Device<uint32_t>>> d_codes;
    std::vector<cuda::PursuitJob> jobs;
    for (int j = 0; j < 2; ++j) {
      dictionaries.push_back(UnitRows(atoms, dim, 31 + 2 * j));
      xs.push_back(RandomVector(vectors * dim, 32 + 2 * j));
      d_dictionaries.push_back(std::make_unique<Device<float>>(dictionaries[j]));
      d_xs.push_back(std::make_unique<Device<float>>(xs[j]));
      d_codes.push_back(std::make_unique<Device<uint32_t>>(vectors * sparsities[j]));
      jobs.push_back({d_dictionaries[j]->get(), d_xs[j]->get(), sparsities[j], d_codes[j]->get()});
    }
    ASSERT_EQ(cuda::matching_pursuit(jobs.data(), 2, atoms, dim, groups, group_size, d_counts.get(), nullptr),
              cudaSuccess);
    for (int j = 0; j < 2; ++j) {
      const std::vector<uint32_t> packed = d_codes[j]->Read();
      const int s_count = sparsities[j];
      std::vector<float> coded_x;
      std::vector<uint16_t> indices;
      std::vector<float> coefficients;
      for (int g = 0; g < groups; ++g)
        for (int t = 0; t < group_size; ++t) {
          const size_t row = size_t(g) * group_size + t;
          for (int s = 0; s < s_count; ++s) {
            const uint32_t code = packed[row * s_count + s];
            if (t >= counts[g]) {
              ASSERT_EQ(code, 0xffffffffu) << "an uncounted row was written";
              continue;
            }
            indices.push_back(uint16_t(code & 0xffff));
            coefficients.push_back(Fp16ToFloat(uint16_t(code >> 16)));
          }
          if (t < counts[g]) coded_x.insert(coded_x.end(), xs[j].begin() + row * dim, xs[j].begin() + (row + 1) * dim);
        }
      EXPECT_TRUE(testing::CodesMatchReference(dictionaries[j], atoms, dim, coded_x, s_count, indices, coefficients))
          << atoms << " atoms, dim " << dim << ", job " << j;
    }
  }
}

}  // namespace
}  // namespace kvplan
