// Every CUDA kernel against its CPU reference on seeded random inputs, including odd shapes. Inputs that the
// GPU stores in bf16 are rounded to bf16 before the CPU reference sees them, so the comparison measures the
// kernel's arithmetic, not the storage format. Every comparison is per element, atol + rtol * |expected|
// (tests/testing/tolerance.h), with the tolerance stated beside each kernel below.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/flash_attention.h"
#include "kernels/cuda/kernels.h"
#include "tests/testing/cuda_test_util.h"
#include "tests/testing/test_util.h"
#include "tests/testing/tolerance.h"

namespace kvplan {
namespace {

using testing::AllClose;
using testing::AsBf16;
using testing::Device;
using testing::RandomVector;
using testing::ReadBf16;
using testing::RoundToBf16;
using testing::ToBf16;
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
  const std::vector<float> gate_up = RandomVector(size_t(rows) * 2 * dim, 5);
  std::vector<float> expected(size_t(rows) * dim);
  cpu::swiglu(gate_up.data(), rows, dim, expected.data());
  Device<float> device_gate_up(gate_up);
  Device<uint16_t> out(expected.size());
  ASSERT_EQ(cuda::swiglu(device_gate_up.get(), rows, dim, AsBf16(out), nullptr), cudaSuccess);
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

TEST(CudaKernelsTest, NoiseFillMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const int64_t n = 100003;
  std::vector<uint16_t> expected(n);
  cpu::fill_noise_bf16(expected.data(), n, 5);
  Device<uint16_t> out(n);
  ASSERT_EQ(cuda::fill_noise_bf16(AsBf16(out), n, 5, nullptr), cudaSuccess);
  EXPECT_EQ(out.Read(), expected);
}

struct AttentionCase {
  int sequences, heads, kv_heads, head_dim, context, rows_per_sequence, sliding_window;
  // The bound passed as max_context; 0 means the context itself. A larger one sizes the cache and is captured
  // once into a CUDA graph that replays at two lengths, as a decode loop would.
  int max_context = 0;
};

// A case's inputs: every sequence's cache filled with `context` random bf16 entries through append_kv, and query
// rows at the last rows_per_sequence positions of each sequence (prefill-like when > 1, decode when 1).
struct AttentionInputs {
  AttentionInputs(const AttentionCase& c, int capacity)
      : c(c),
        capacity(capacity),
        kv_row(size_t(c.kv_heads) * c.head_dim),
        rows(c.sequences * c.rows_per_sequence),
        k_cache(size_t(c.sequences) * kv_row * capacity),
        v_cache(size_t(c.sequences) * kv_row * capacity) {
    std::vector<int32_t> fill_sequences, fill_positions;
    for (int s = 0; s < c.sequences; ++s)
      for (int p = 0; p < c.context; ++p) {
        fill_sequences.push_back(s);
        fill_positions.push_back(p);
      }
    k = RoundToBf16(RandomVector(fill_positions.size() * kv_row, 10, 1.5f));
    v = RoundToBf16(RandomVector(fill_positions.size() * kv_row, 11));
    Device<float> device_k(k), device_v(v);
    Device<int32_t> device_fill_sequences(fill_sequences), device_fill_positions(fill_positions);
    EXPECT_EQ(cuda::append_kv(device_k.get(), device_v.get(), device_fill_sequences.get(), device_fill_positions.get(),
                              int(fill_positions.size()), c.kv_heads, c.head_dim, capacity, AsBf16(k_cache),
                              AsBf16(v_cache), nullptr),
              cudaSuccess);
    for (int s = 0; s < c.sequences; ++s)
      for (int r = 0; r < c.rows_per_sequence; ++r) {
        row_sequences.push_back(s);
        row_positions.push_back(c.context - c.rows_per_sequence + r);
      }
    q = RandomVector(size_t(rows) * c.heads * c.head_dim, 12);
  }

  using Oracle = void (*)(const float*, const int32_t*, int, int, const cpu::KvHeadView*, int, int, float, int,
                          float*);
  // The oracle's output for the rows at `positions`.
  std::vector<float> Expected(const std::vector<int32_t>& positions, Oracle oracle) const {
    std::vector<int32_t> entry_positions(c.context);
    std::iota(entry_positions.begin(), entry_positions.end(), 0);
    std::vector<float> expected(q.size());
    for (int s = 0; s < c.sequences; ++s) {
      // The oracle wants [entries, head_dim] per KV head; the fill order is [position, kv_head, head_dim].
      std::vector<std::vector<float>> keys(c.kv_heads), values(c.kv_heads);
      std::vector<cpu::KvHeadView> views(c.kv_heads);
      for (int h = 0; h < c.kv_heads; ++h) {
        for (int p = 0; p < c.context; ++p) {
          const size_t source = (size_t(s) * c.context + p) * kv_row + size_t(h) * c.head_dim;
          keys[h].insert(keys[h].end(), k.begin() + source, k.begin() + source + c.head_dim);
          values[h].insert(values[h].end(), v.begin() + source, v.begin() + source + c.head_dim);
        }
        views[h] = {keys[h].data(), values[h].data(), entry_positions.data(), c.context};
      }
      const size_t offset = size_t(s) * c.rows_per_sequence * c.heads * c.head_dim;
      oracle(q.data() + offset, positions.data() + s * c.rows_per_sequence, c.rows_per_sequence, c.heads,
             views.data(), c.kv_heads, c.head_dim, Scale(), c.sliding_window, expected.data() + offset);
    }
    return expected;
  }
  float Scale() const { return 1.0f / std::sqrt(float(c.head_dim)); }
  std::string Name() const {
    return absl::StrFormat("sequences %d heads %d/%d head_dim %d context %d rows %d window %d", c.sequences, c.heads,
                           c.kv_heads, c.head_dim, c.context, c.rows_per_sequence, c.sliding_window);
  }

  AttentionCase c;
  int capacity;
  size_t kv_row;
  int rows;
  Device<uint16_t> k_cache, v_cache;
  std::vector<float> k, v, q;
  std::vector<int32_t> row_sequences, row_positions;
};

// Attends with the split-KV kernel and compares with cpu::attention.
void CheckAttention(const AttentionCase& c) {
  const int max_context = c.max_context > 0 ? c.max_context : c.context;
  AttentionInputs inputs(c, std::max(c.context + 3, max_context));
  const std::vector<float>& q = inputs.q;
  const std::vector<int32_t>& row_positions = inputs.row_positions;
  const int rows = inputs.rows;
  Device<float> device_q(q);
  Device<int32_t> device_sequences(inputs.row_sequences), device_positions(row_positions);
  Device<char> workspace(cuda::attention_workspace_bytes(rows, c.heads, c.kv_heads, c.head_dim, max_context));
  Device<uint16_t> out(q.size());
  auto expected_at = [&](const std::vector<int32_t>& positions) { return inputs.Expected(positions, cpu::attention); };
  const std::string shape_name = inputs.Name() + absl::StrFormat(" max_context %d", max_context);
  auto attend = [&](cudaStream_t stream) {
    return cuda::attention(device_q.get(), device_sequences.get(), device_positions.get(), rows, c.heads, c.kv_heads,
                           c.head_dim, inputs.capacity, AsBf16(inputs.k_cache), AsBf16(inputs.v_cache),
                           inputs.Scale(), c.sliding_window, max_context, workspace.get(), AsBf16(out), stream);
  };

  if (c.max_context == 0) {
    ASSERT_EQ(attend(nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(AllClose(ReadBf16(out), expected_at(row_positions), kBf16Attention)) << shape_name;
    return;
  }
  // One capture with the capacity as the bound; replays read the positions the device holds at the time, first
  // a third of the way in, then at the full context.
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  ASSERT_EQ(attend(stream), cudaSuccess);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cudaGraphExec_t replay;
  ASSERT_EQ(cudaGraphInstantiate(&replay, graph, 0), cudaSuccess);
  std::vector<int32_t> earlier_positions = row_positions;
  for (int32_t& position : earlier_positions) position /= 3;
  for (const std::vector<int32_t>* positions : {static_cast<const std::vector<int32_t>*>(&earlier_positions), &row_positions}) {
    ASSERT_EQ(cudaMemcpyAsync(device_positions.get(), positions->data(), positions->size() * sizeof(int32_t),
                              cudaMemcpyHostToDevice, stream),
              cudaSuccess);
    ASSERT_EQ(cudaMemsetAsync(out.get(), 0xff, q.size() * sizeof(uint16_t), stream), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(replay, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_TRUE(AllClose(ReadBf16(out), expected_at(*positions), kBf16Attention))
        << shape_name << (positions == &row_positions ? "" : ", replayed at a third of the context");
  }
  EXPECT_EQ(cudaGraphExecDestroy(replay), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(CudaKernelsTest, AttentionMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const AttentionCase cases[] = {
      {1, 4, 2, 64, 1, 1, 0},
      {1, 4, 2, 64, 257, 1, 0},
      {2, 32, 8, 128, 4099, 1, 0},
      {3, 7, 1, 128, 999, 1, 0},
      {1, 28, 4, 128, 130, 17, 0},
      {2, 6, 3, 32, 300, 5, 64},
      {1, 16, 2, 256, 1000, 2, 0},
      {5, 8, 8, 64, 77, 3, 0},
      {1, 64, 8, 128, 32768, 1, 0},
      // max_context far above the context: the grid is sized for the capacity, the work for the positions.
      {2, 32, 8, 128, 4099, 1, 0, 40000},
      {16, 32, 8, 128, 4096, 1, 0, 16384},
      {1, 32, 8, 128, 65, 1, 0, 32768},
      {1, 4, 2, 64, 1, 1, 0, 100000},
      {1, 28, 4, 128, 130, 17, 0, 5000},
      {3, 7, 1, 128, 999, 1, 0, 65536},
      {2, 6, 3, 32, 300, 5, 64, 2048},
      {1, 16, 2, 256, 1000, 2, 0, 9000},
      {1, 8, 8, 64, 20000, 1, 0, 131072},
  };
  for (const AttentionCase& c : cases) CheckAttention(c);
}

// The tensor-core prefill kernel against cpu::flash_attention on the same inputs, the rows of each sequence in tiles
// of at most kFlashRows. Tolerance: the split kernel's (kBf16Attention) plus the softmax weights' rounding to bf16
// before P V, at most 2^-9 relative per weight, which moves a row's output by at most 2^-9 of its largest |value|.
void CheckFlashAttention(const AttentionCase& c) {
  AttentionInputs inputs(c, c.context + 5);
  std::vector<int32_t> row_begin;
  for (int s = 0; s <= c.sequences; ++s) row_begin.push_back(s * c.rows_per_sequence);
  std::vector<int32_t> tiles(2 * cuda::flash_tile_bound(inputs.rows, c.sequences));
  const int tile_count = cuda::flash_tiles(row_begin.data(), c.sequences, tiles.data());
  Device<float> device_q(inputs.q);
  Device<int32_t> device_sequences(inputs.row_sequences), device_positions(inputs.row_positions), device_tiles(tiles);
  Device<uint16_t> out(inputs.q.size());
  ASSERT_EQ(cuda::flash_attention(device_q.get(), device_sequences.get(), device_positions.get(), device_tiles.get(),
                                  tile_count, c.heads, c.kv_heads, c.head_dim, inputs.capacity,
                                  AsBf16(inputs.k_cache), AsBf16(inputs.v_cache), inputs.Scale(), c.sliding_window,
                                  AsBf16(out), nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  float largest_value = 0.0f;
  for (float x : inputs.v) largest_value = std::max(largest_value, std::abs(x));
  const Tolerance tolerance{.atol = kBf16Attention.atol + 0x1p-9 * largest_value, .rtol = kBf16Attention.rtol};
  EXPECT_TRUE(AllClose(ReadBf16(out), inputs.Expected(inputs.row_positions, cpu::flash_attention), tolerance))
      << inputs.Name();
}

TEST(CudaKernelsTest, FlashAttentionMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  const AttentionCase cases[] = {
      {1, 4, 2, 64, 1, 1, 0},          {1, 4, 2, 64, 64, 64, 0},        {1, 4, 2, 64, 300, 300, 0},
      {2, 32, 8, 128, 1000, 1000, 0},  {3, 7, 1, 128, 999, 130, 0},     {1, 28, 4, 128, 130, 17, 0},
      {2, 6, 3, 64, 300, 200, 64},     {5, 8, 8, 64, 77, 65, 0},        {1, 16, 2, 128, 4099, 4099, 0},
      {2, 12, 4, 128, 2000, 129, 300}, {1, 64, 8, 128, 8192, 8192, 0},
  };
  for (const AttentionCase& c : cases) CheckFlashAttention(c);
}

TEST(CudaKernelsTest, FlashTilesCoverEachSequenceInTiles) {
  const std::vector<int32_t> row_begin = {0, 1, 65, 65, 200};
  std::vector<int32_t> tiles(2 * cuda::flash_tile_bound(200, 4));
  ASSERT_EQ(cuda::flash_tiles(row_begin.data(), 4, tiles.data()), 5);
  tiles.resize(10);
  EXPECT_EQ(tiles, (std::vector<int32_t>{0, 1, 1, 65, 65, 129, 129, 193, 193, 200}));
}

TEST(CudaKernelsTest, AttentionRejectsUnsupportedShapes) {
  EXPECT_FALSE(cuda::attention_supported(32, 2, 128));  // 16 query heads per KV head
  EXPECT_FALSE(cuda::attention_supported(8, 8, 80));
  EXPECT_TRUE(cuda::attention_supported(32, 8, 128));
  EXPECT_FALSE(cuda::flash_attention_supported(32, 8, 256));
  EXPECT_TRUE(cuda::flash_attention_supported(32, 8, 128));
}

}  // namespace
}  // namespace kvplan
