// Every CUDA kernel against its CPU reference on seeded random inputs, including odd shapes. Inputs that the
// GPU stores in bf16 are rounded to bf16 before the CPU reference sees them, so the comparison measures the
// kernel's arithmetic, not the storage format. Every comparison is per element, atol + rtol * |expected|
// (tests/testing/tolerance.h), with the tolerance stated beside each kernel below.
#include <cuda_runtime.h>

#include <random>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/cpu_reference.h"
#include "kernels/cuda/kernels.h"
#include "loader/safetensors.h"
#include "tests/testing/cuda_test_util.h"
#include "tests/testing/matching_pursuit_check.h"
#include "tests/testing/test_util.h"
#include "tests/testing/tolerance.h"

namespace kvplan {
namespace {

using testing::AllClose;
using testing::Tolerance;

// A bf16 output is rounded once from an fp32 result that may differ from the reference's in its last bits, so
// it can land one bf16 step (2^-7 relative: 8 significant bits) away.
constexpr Tolerance kBf16Output{.atol = 1e-5, .rtol = 0x1p-7};
// fp32 elementwise arithmetic in the same order as the reference.
constexpr Tolerance kFp32Exact{.atol = 0, .rtol = 1e-6};
// fp32 reductions and transcendental functions whose order or implementation differs from the reference's.
constexpr Tolerance kFp32Reduction{.atol = 1e-6, .rtol = 1e-5};
// RoPE at positions up to 40K: angles agree to ~1e-7 relative, so a rotated element can be off by that much of
// its pair's magnitude, which matters where the element itself is near zero.
constexpr Tolerance kRope{.atol = 2e-5, .rtol = 1e-4};
// Attention over a bf16 cache with bf16 output: fast-math exp and a split-KV summation order feed the final
// bf16 rounding; outputs are averages of unit-scale values, so the absolute term covers near-zero averages.
constexpr Tolerance kBf16Attention{.atol = 1e-3, .rtol = 0x1p-7};
// Sparse-coded attention, fp32 output: keys rebuilt from the same fp16 codes and rotated with fp32 sincos,
// fast-math exp, a different summation order.
constexpr Tolerance kCodedAttention{.atol = 2e-4, .rtol = 2e-3};
constexpr Tolerance kCodedProbabilities{.atol = 1e-4, .rtol = 1e-3};

std::vector<float> RandomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(n);
  for (float& value : values) value = normal(generator);
  return values;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = FloatToBf16(values[i]);
  return out;
}

std::vector<float> RoundToBf16(const std::vector<float>& values) {
  std::vector<float> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = Bf16ToFloat(FloatToBf16(values[i]));
  return out;
}

// Device copy of a host vector, poisoned-output helpers and readback.
template <typename T>
class Device {
 public:
  explicit Device(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&data_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemset(data_, 0xff, n * sizeof(T)), cudaSuccess);  // NaN poison: unwritten outputs fail
  }
  explicit Device(const std::vector<T>& host) : Device(host.size()) {
    EXPECT_EQ(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Device() { cudaFree(data_); }
  T* get() { return data_; }
  std::vector<T> Read() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaMemcpy(host.data(), data_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t n_;
};

std::vector<float> ReadBf16(const Device<uint16_t>& device) {
  std::vector<float> out;
  for (uint16_t bits : device.Read()) out.push_back(Bf16ToFloat(bits));
  return out;
}

__nv_bfloat16* AsBf16(Device<uint16_t>& device) { return reinterpret_cast<__nv_bfloat16*>(device.get()); }

TEST(CudaKernelsTest, RmsNormMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [rows, dim] : {std::pair{1, 256}, {3, 37}, {7, 1002}, {19, 4096}, {5, 8192}}) {
    const std::vector<float> x = RandomVector(size_t(rows) * dim, 1, 3.0f);
    const std::vector<float> weight = RoundToBf16(RandomVector(dim, 2));
    std::vector<float> expected(x.size());
    cpu::rms_norm(x.data(), weight.data(), rows, dim, 1e-5f, expected.data());
    Device<float> device_x(x);
    Device<uint16_t> device_weight(ToBf16(weight)), out(x.size());
    ASSERT_EQ(cuda::rms_norm(device_x.get(), AsBf16(device_weight), rows, dim, 1e-5f, AsBf16(out), nullptr),
              cudaSuccess);
    const std::vector<float> actual = ReadBf16(out);
    EXPECT_TRUE(AllClose(actual, expected, kBf16Output)) << rows << "x" << dim;
  }
}

TEST(CudaKernelsTest, RopeMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [rows, heads, head_dim] : {std::tuple{1, 1, 64}, {5, 3, 128}, {33, 8, 96}, {2, 32, 256}}) {
    std::vector<float> x = RandomVector(size_t(rows) * heads * head_dim, 3);
    std::vector<int32_t> positions(rows);
    std::mt19937 generator(4);
    for (int32_t& position : positions) position = int32_t(generator() % 40000);
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; ++i) inv_freq[i] = float(std::pow(500000.0, -2.0 * i / head_dim));
    Device<float> device_x(x), device_freq(inv_freq);
    Device<int32_t> device_positions(positions);
    cpu::apply_rope(x.data(), positions.data(), inv_freq.data(), rows, heads, head_dim, 1.1f);
    ASSERT_EQ(cuda::apply_rope(device_x.get(), device_positions.get(), device_freq.get(), rows, heads, head_dim, 1.1f,
                               nullptr),
              cudaSuccess);
    const std::vector<float> actual = device_x.Read();
    EXPECT_TRUE(AllClose(actual, x, kRope)) << rows << "x" << heads << "x" << head_dim;
  }
}

TEST(CudaKernelsTest, SwigluBiasAndEmbedMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const int rows = 13, dim = 701;
  const std::vector<float> gate = RandomVector(size_t(rows) * dim, 5), up = RandomVector(size_t(rows) * dim, 6);
  std::vector<float> expected(gate.size());
  cpu::swiglu(gate.data(), up.data(), int64_t(gate.size()), expected.data());
  Device<float> device_gate(gate), device_up(up);
  Device<uint16_t> out(gate.size());
  ASSERT_EQ(cuda::swiglu(device_gate.get(), device_up.get(), int64_t(gate.size()), AsBf16(out), nullptr), cudaSuccess);
  const std::vector<float> actual = ReadBf16(out);
  EXPECT_TRUE(AllClose(actual, expected, kBf16Output));

  std::vector<float> x = RandomVector(size_t(rows) * dim, 7);
  const std::vector<float> bias = RandomVector(dim, 8);
  Device<float> device_x(x), device_bias(bias);
  cpu::add_row_bias(x.data(), bias.data(), rows, dim);
  ASSERT_EQ(cuda::add_row_bias(device_x.get(), device_bias.get(), rows, dim, nullptr), cudaSuccess);
  EXPECT_TRUE(AllClose(device_x.Read(), x, kFp32Exact));

  const int vocab = 50;
  const std::vector<float> table = RoundToBf16(RandomVector(size_t(vocab) * dim, 9));
  const std::vector<int32_t> tokens = {3, 49, 0, 3, 17};
  Device<uint16_t> device_table(ToBf16(table));
  Device<int32_t> device_tokens(tokens);
  Device<float> embedded(tokens.size() * dim);
  ASSERT_EQ(
      cuda::embed_tokens(AsBf16(device_table), device_tokens.get(), int(tokens.size()), dim, embedded.get(), nullptr),
      cudaSuccess);
  const std::vector<float> rows_out = embedded.Read();
  for (size_t r = 0; r < tokens.size(); ++r)
    for (int i = 0; i < dim; ++i) ASSERT_EQ(rows_out[r * dim + i], table[size_t(tokens[r]) * dim + i]);
}

struct AttentionCase {
  int sequences, heads, kv_heads, head_dim, context, rows_per_sequence, sliding_window;
};

// Appends random K/V through append_kv, then attends with the last rows_per_sequence positions of each
// sequence as queries (prefill-like when > 1, decode when 1), and compares with cpu::attention.
void CheckAttention(const AttentionCase& c) {
  const int capacity = c.context + 3;
  const int rows = c.sequences * c.rows_per_sequence;
  const size_t kv_row = size_t(c.kv_heads) * c.head_dim;
  // Fill every sequence's cache with `context` entries through append_kv.
  std::vector<int32_t> fill_sequences, fill_positions;
  for (int s = 0; s < c.sequences; ++s)
    for (int p = 0; p < c.context; ++p) {
      fill_sequences.push_back(s);
      fill_positions.push_back(p);
    }
  const std::vector<float> k = RoundToBf16(RandomVector(fill_positions.size() * kv_row, 10, 1.5f));
  const std::vector<float> v = RoundToBf16(RandomVector(fill_positions.size() * kv_row, 11));
  const size_t cache_elements = size_t(c.sequences) * c.kv_heads * capacity * c.head_dim;
  Device<float> device_k(k), device_v(v);
  Device<int32_t> device_fill_sequences(fill_sequences), device_fill_positions(fill_positions);
  Device<uint16_t> k_cache(cache_elements), v_cache(cache_elements);
  ASSERT_EQ(cuda::append_kv(device_k.get(), device_v.get(), device_fill_sequences.get(), device_fill_positions.get(),
                            int(fill_positions.size()), c.kv_heads, c.head_dim, capacity, AsBf16(k_cache),
                            AsBf16(v_cache), nullptr),
            cudaSuccess);

  std::vector<int32_t> row_sequences, row_positions;
  for (int s = 0; s < c.sequences; ++s)
    for (int r = 0; r < c.rows_per_sequence; ++r) {
      row_sequences.push_back(s);
      row_positions.push_back(c.context - c.rows_per_sequence + r);
    }
  const std::vector<float> q = RandomVector(size_t(rows) * c.heads * c.head_dim, 12);
  Device<float> device_q(q);
  Device<int32_t> device_sequences(row_sequences), device_positions(row_positions);
  Device<char> workspace(cuda::attention_workspace_bytes(rows, c.heads, c.head_dim, c.context));
  Device<uint16_t> out(q.size());
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  ASSERT_EQ(cuda::attention(device_q.get(), device_sequences.get(), device_positions.get(), rows, c.heads, c.kv_heads,
                            c.head_dim, capacity, AsBf16(k_cache), AsBf16(v_cache), scale, c.sliding_window, c.context,
                            workspace.get(), AsBf16(out), nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> actual = ReadBf16(out);

  std::vector<int32_t> entry_positions(c.context);
  std::iota(entry_positions.begin(), entry_positions.end(), 0);
  std::vector<float> expected(q.size());
  for (int s = 0; s < c.sequences; ++s) {
    // cpu::attention wants [entries, head_dim] per KV head; the fill order is [position, kv_head, head_dim].
    std::vector<std::vector<float>> keys(c.kv_heads), values(c.kv_heads);
    std::vector<cpu::KvHeadView> views(c.kv_heads);
    for (int h = 0; h < c.kv_heads; ++h) {
      for (int p = 0; p < c.context; ++p) {
        const size_t source = (size_t(s) * c.context + p) * kv_row + size_t(h) * c.head_dim;
        keys[h].insert(keys[h].end(), k.begin() + source, k.begin() + source + c.head_dim);
        values[h].insert(values[h].end(), v.begin() + source, v.begin() + source + c.head_dim);
      }
      views[h] = {keys[h].data(), values[h].data(), entry_positions.data(), nullptr, c.context};
    }
    const size_t offset = size_t(s) * c.rows_per_sequence * c.heads * c.head_dim;
    cpu::attention(q.data() + offset, row_positions.data() + s * c.rows_per_sequence, c.rows_per_sequence, c.heads,
                   views.data(), c.kv_heads, c.head_dim, scale, c.sliding_window, expected.data() + offset);
  }
  EXPECT_TRUE(AllClose(actual, expected, kBf16Attention))
      << "sequences " << c.sequences << " heads " << c.heads << "/" << c.kv_heads << " head_dim " << c.head_dim
      << " context " << c.context << " rows " << c.rows_per_sequence << " window " << c.sliding_window;
}

TEST(CudaKernelsTest, AttentionMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const AttentionCase cases[] = {
      {1, 4, 2, 64, 1, 1, 0},      {1, 4, 2, 64, 257, 1, 0},    {2, 32, 8, 128, 4099, 1, 0},
      {3, 7, 1, 128, 999, 1, 0},   {1, 28, 4, 128, 130, 17, 0}, {2, 6, 3, 32, 300, 5, 64},
      {1, 16, 2, 256, 1000, 2, 0}, {5, 8, 8, 64, 77, 3, 0},     {1, 64, 8, 128, 32768, 1, 0},
  };
  for (const AttentionCase& c : cases) CheckAttention(c);
}

TEST(CudaKernelsTest, AttentionRejectsUnsupportedShapes) {
  EXPECT_FALSE(cuda::attention_supported(32, 2, 128));  // 16 query heads per KV head
  EXPECT_FALSE(cuda::attention_supported(8, 8, 80));
  EXPECT_TRUE(cuda::attention_supported(32, 8, 128));
}

// --- Compressed caches: fp32 outputs from identical fp16 codes.

std::vector<__half> ToHalf(const std::vector<float>& values) {
  std::vector<__half> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = __float2half_rn(values[i]);
  return out;
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

struct SparseCase {
  int heads, kv_heads, head_dim, rows, coded_per_head, dense_per_head, atoms, key_sparsity, value_sparsity;
};

void CheckSparseAttention(const SparseCase& c) {
  std::mt19937 generator(c.heads * 131 + c.head_dim + c.rows);
  const std::vector<float> key_dictionary = UnitRows(c.atoms, c.head_dim, 21);
  const std::vector<float> value_dictionary = UnitRows(c.atoms, c.head_dim, 22);
  std::vector<float> inv_freq(c.head_dim / 2);
  for (int i = 0; i < c.head_dim / 2; ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * i / c.head_dim));
  const int coded_total = c.coded_per_head * c.kv_heads, dense_total = c.dense_per_head * c.kv_heads;
  std::vector<uint16_t> key_atoms(coded_total * c.key_sparsity), value_atoms(coded_total * c.value_sparsity);
  for (uint16_t& atom : key_atoms) atom = uint16_t(generator() % c.atoms);
  for (uint16_t& atom : value_atoms) atom = uint16_t(generator() % c.atoms);
  std::vector<float> key_coefficients = RandomVector(key_atoms.size(), 23, 2.0f);
  std::vector<float> value_coefficients = RandomVector(value_atoms.size(), 24);
  for (float& value : key_coefficients) value = cpu::round_to_fp16(value);
  for (float& value : value_coefficients) value = cpu::round_to_fp16(value);
  const int context = c.coded_per_head + c.dense_per_head + 10;
  std::vector<int32_t> coded_positions(coded_total), dense_positions(dense_total);
  for (int32_t& position : coded_positions) position = int32_t(generator() % context);
  for (int32_t& position : dense_positions) position = int32_t(generator() % context);
  const std::vector<float> dense_keys = RandomVector(size_t(dense_total) * c.head_dim, 25);
  const std::vector<float> dense_values = RandomVector(size_t(dense_total) * c.head_dim, 26);
  std::vector<float> dense_bias = RandomVector(dense_total, 27, 0.5f);
  std::vector<int32_t> coded_offsets(c.kv_heads + 1), dense_offsets(c.kv_heads + 1);
  for (int h = 0; h <= c.kv_heads; ++h) {
    coded_offsets[h] = h * c.coded_per_head;
    dense_offsets[h] = h * c.dense_per_head;
  }
  const std::vector<float> q = RandomVector(size_t(c.rows) * c.heads * c.head_dim, 28);
  std::vector<int32_t> query_positions(c.rows);
  for (int r = 0; r < c.rows; ++r) query_positions[r] = context - 12 + 5 * r;  // some entries lie in the future

  std::vector<cpu::CodedHeadView> views(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) {
    const int coded = coded_offsets[h], dense = dense_offsets[h];
    views[h] = {key_atoms.data() + coded * c.key_sparsity,
                key_coefficients.data() + coded * c.key_sparsity,
                value_atoms.data() + coded * c.value_sparsity,
                value_coefficients.data() + coded * c.value_sparsity,
                coded_positions.data() + coded,
                c.coded_per_head,
                cpu::KvHeadView{dense_keys.data() + int64_t(dense) * c.head_dim,
                                dense_values.data() + int64_t(dense) * c.head_dim, dense_positions.data() + dense,
                                dense_bias.data() + dense, c.dense_per_head}};
  }
  const float scale = 1.0f / std::sqrt(float(c.head_dim));
  const cpu::SparseAttentionParams params{c.rows,
                                          c.heads,
                                          c.kv_heads,
                                          c.head_dim,
                                          c.key_sparsity,
                                          c.value_sparsity,
                                          key_dictionary.data(),
                                          value_dictionary.data(),
                                          inv_freq.data(),
                                          1.0f,
                                          scale};
  std::vector<float> expected(q.size()), expected_probabilities(coded_total + dense_total);
  cpu::sparse_attention(params, q.data(), query_positions.data(), views.data(), expected.data(),
                        expected_probabilities.data());

  Device<float> d_q(q), d_key_dictionary(key_dictionary), d_value_dictionary(value_dictionary), d_freq(inv_freq);
  Device<int32_t> d_positions(query_positions), d_coded_offsets(coded_offsets), d_dense_offsets(dense_offsets);
  Device<uint16_t> d_key_atoms(key_atoms), d_value_atoms(value_atoms);
  Device<__half> d_key_coefficients(ToHalf(key_coefficients)), d_value_coefficients(ToHalf(value_coefficients));
  Device<int32_t> d_coded_positions(coded_positions), d_dense_positions(dense_positions);
  Device<float> d_dense_keys(dense_keys), d_dense_values(dense_values), d_dense_bias(dense_bias);
  Device<float> out(q.size()), probabilities(expected_probabilities.size());
  const cuda::CompressedCacheView cache{d_coded_offsets.get(),   d_key_atoms.get(),          d_key_coefficients.get(),
                                        d_value_atoms.get(),     d_value_coefficients.get(), d_coded_positions.get(),
                                        d_dense_offsets.get(),   d_dense_keys.get(),         d_dense_values.get(),
                                        d_dense_positions.get(), d_dense_bias.get()};
  const cuda::SparseAttentionShape shape{.rows = c.rows,
                                         .heads = c.heads,
                                         .kv_heads = c.kv_heads,
                                         .head_dim = c.head_dim,
                                         .key_sparsity = c.key_sparsity,
                                         .value_sparsity = c.value_sparsity,
                                         .scale = scale,
                                         .max_entries_per_head = c.coded_per_head + c.dense_per_head,
                                         .total_entries = coded_total + dense_total};
  // Once with probabilities (unsplit), once without (split-KV); both outputs must match the reference.
  Device<char> probability_workspace(cuda::sparse_attention_workspace_bytes(shape, true));
  Device<char> split_workspace(cuda::sparse_attention_workspace_bytes(shape, false));
  Device<float> split_out(q.size());
  ASSERT_EQ(cuda::sparse_attention(shape, d_q.get(), d_positions.get(), cache, d_key_dictionary.get(),
                                   d_value_dictionary.get(), d_freq.get(), out.get(), probabilities.get(),
                                   probability_workspace.get(), nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::sparse_attention(shape, d_q.get(), d_positions.get(), cache, d_key_dictionary.get(),
                                   d_value_dictionary.get(), d_freq.get(), split_out.get(), nullptr,
                                   split_workspace.get(), nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::string shape_name =
      absl::StrFormat("%d/%d heads, head_dim %d, %d rows", c.heads, c.kv_heads, c.head_dim, c.rows);
  EXPECT_TRUE(AllClose(split_out.Read(), expected, kCodedAttention)) << "split, " << shape_name;
  EXPECT_TRUE(AllClose(out.Read(), expected, kCodedAttention)) << shape_name;
  EXPECT_TRUE(AllClose(probabilities.Read(), expected_probabilities, kCodedProbabilities)) << shape_name;
}

TEST(CudaCompressedKernelsTest, SparseAttentionMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const SparseCase cases[] = {{4, 2, 64, 1, 100, 7, 64, 8, 8},
                              {7, 7, 64, 3, 33, 0, 17, 4, 4},
                              {32, 8, 128, 1, 513, 31, 1024, 8, 4},
                              {28, 4, 128, 2, 0, 40, 5, 2, 2},
                              {8, 1, 256, 1, 77, 3, 300, 16, 16}};
  for (const SparseCase& c : cases) CheckSparseAttention(c);
}

TEST(CudaCompressedKernelsTest, MatchingPursuitMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [atoms, dim, vectors, sparsity] : {std::tuple{1024, 64, 257, 8}, {37, 128, 100, 4}, {5, 64, 9, 5}}) {
    const std::vector<float> dictionary = UnitRows(atoms, dim, 31);
    const std::vector<float> x = RandomVector(size_t(vectors) * dim, 32);
    Device<float> d_dictionary(dictionary), d_x(x);
    Device<uint16_t> indices(size_t(vectors) * sparsity);
    Device<__half> coefficients(size_t(vectors) * sparsity);
    ASSERT_EQ(cuda::matching_pursuit(d_dictionary.get(), atoms, dim, d_x.get(), vectors, sparsity, indices.get(),
                                     coefficients.get(), nullptr),
              cudaSuccess);
    std::vector<float> gpu_coefficients;
    for (__half coefficient : coefficients.Read()) gpu_coefficients.push_back(__half2float(coefficient));
    EXPECT_TRUE(testing::CodesMatchReference(dictionary, atoms, dim, x, sparsity, indices.Read(), gpu_coefficients))
        << atoms << " atoms, dim " << dim;
  }
}

TEST(CudaCompressedKernelsTest, KeyNormsAndMergeMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const int n = 333, dim = 128;
  const std::vector<float> keys = RandomVector(size_t(n) * dim, 41), values = RandomVector(size_t(n) * dim, 42);
  std::vector<float> expected(n);
  cpu::key_l2_norms(keys.data(), n, dim, expected.data());
  Device<float> d_keys(keys), d_values(values), norms(n);
  ASSERT_EQ(cuda::key_l2_norms(d_keys.get(), n, dim, norms.get(), nullptr), cudaSuccess);
  EXPECT_TRUE(AllClose(norms.Read(), expected, kFp32Reduction));

  std::vector<float> slot_key = RandomVector(dim, 43), slot_value = RandomVector(dim, 44);
  float slot_tokens = 3.0f;
  Device<float> d_slot_key(slot_key), d_slot_value(slot_value), d_tokens(std::vector<float>{slot_tokens});
  cpu::merge_into_slot(keys.data(), values.data(), 17, dim, slot_key.data(), slot_value.data(), &slot_tokens);
  ASSERT_EQ(cuda::merge_into_slot(d_keys.get(), d_values.get(), 17, dim, d_slot_key.get(), d_slot_value.get(),
                                  d_tokens.get(), nullptr),
            cudaSuccess);
  EXPECT_TRUE(AllClose(d_slot_key.Read(), slot_key, kFp32Reduction));
  EXPECT_TRUE(AllClose(d_slot_value.Read(), slot_value, kFp32Reduction));
  EXPECT_EQ(d_tokens.Read()[0], 20.0f);
}

}  // namespace
}  // namespace kvplan
