// Decode-attention kernels at real scale (Llama-3-8B heads: 32 query / 8 KV heads, head_dim 128), one layer:
// the dense bf16 split-KV kernel against the sparse-coded kernel (keys and values as atom/coefficient pairs,
// RoPE applied on the fly). Prints median microseconds and the bytes each read per call.
//   build-cuda/bench/kernel_bench [contexts...]
//
// The dense kernel runs decode rows at batch 1 and 16, and 512 prefill-like rows of one sequence, with
// max_context equal to the context and 4x it (a cache sized for a longer generation, launched once into a CUDA
// graph). Each timing replays a graph of back-to-back calls, as the layers of a decode step run, and divides by
// the calls: "cold" rotates over enough cache copies that every call reads HBM, as a real step does (each layer
// has its own cache); "hot" repeats one copy, which at small contexts then sits in L2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "kernels/cuda/kernels.h"
#include "plans/cache_policy.h"

namespace {

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    const cudaError_t error = (call);                                                                \
    if (error != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(error)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

template <typename T>
T* DeviceRandom(size_t n, std::mt19937& generator, float scale, bool integer_below = false, int limit = 0) {
  std::vector<T> host(n);
  std::normal_distribution<float> normal(0.0f, scale);
  for (T& value : host) {
    if constexpr (std::is_same_v<T, uint16_t>) {
      value = uint16_t(generator() % limit);
    } else if constexpr (std::is_same_v<T, __half>) {
      value = __float2half(normal(generator));
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      value = __float2bfloat16(normal(generator));
    } else {
      value = integer_below ? T(generator() % limit) : T(normal(generator));
    }
  }
  T* device;
  CHECK(cudaMalloc(&device, n * sizeof(T)));
  CHECK(cudaMemcpy(device, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename Launch>
float MedianMicroseconds(Launch launch) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 5; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < 50; ++i) {
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.0f);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Median over replays of a graph that holds `calls` launches, per launch.
template <typename Launch>
float GraphMicrosecondsPerCall(int calls, Launch launch) {
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) launch(i, stream);
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, stream));
  std::vector<float> times;
  for (int i = 0; i < 30; ++i) {
    CHECK(cudaEventRecord(start, stream));
    CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaEventRecord(stop, stream));
    CHECK(cudaEventSynchronize(stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.0f / calls);
  }
  std::sort(times.begin(), times.end());
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  CHECK(cudaStreamDestroy(stream));
  return times[times.size() / 2];
}

struct DenseTiming {
  float cold_us, hot_us;
};

std::vector<__nv_bfloat16> HostRandomBf16(size_t n, std::mt19937& generator) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<__nv_bfloat16> values(n);
  for (__nv_bfloat16& value : values) value = __float2bfloat16(normal(generator));
  return values;
}

// Dense attention over `batch` sequences of caches with capacity max_context, each queried by the last
// rows_per_sequence positions of its context (1: decode). Every sequence and copy holds host_k/host_v
// ([kv_heads, context, head_dim]): the values do not change the kernel's work.
DenseTiming TimeDenseAttention(int batch, int rows_per_sequence, int context, int max_context, int heads, int kv_heads,
                               int head_dim, const std::vector<__nv_bfloat16>& host_k,
                               const std::vector<__nv_bfloat16>& host_v, std::mt19937& generator) {
  const int rows = batch * rows_per_sequence;
  const size_t bytes_read = 2 * size_t(batch) * kv_heads * context * head_dim * sizeof(__nv_bfloat16);
  int device, l2_bytes;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  // Twice L2 between two reads of one copy, so none of it is still cached.
  const int copies = int(std::max<size_t>(1, (2 * size_t(l2_bytes) + bytes_read - 1) / bytes_read));

  const size_t head_pitch = size_t(max_context) * head_dim * sizeof(__nv_bfloat16);
  const size_t head_filled = size_t(context) * head_dim * sizeof(__nv_bfloat16);
  const size_t cache_bytes = size_t(batch) * kv_heads * head_pitch;
  std::vector<__nv_bfloat16*> k_caches(copies), v_caches(copies);
  for (int c = 0; c < copies; ++c) {
    CHECK(cudaMalloc(&k_caches[c], cache_bytes));
    CHECK(cudaMalloc(&v_caches[c], cache_bytes));
    for (int b = 0; b < batch; ++b) {
      const size_t offset = size_t(b) * kv_heads * head_pitch;
      CHECK(cudaMemcpy2D(reinterpret_cast<char*>(k_caches[c]) + offset, head_pitch, host_k.data(), head_filled,
                         head_filled, kv_heads, cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy2D(reinterpret_cast<char*>(v_caches[c]) + offset, head_pitch, host_v.data(), head_filled,
                         head_filled, kv_heads, cudaMemcpyHostToDevice));
    }
  }
  float* q = DeviceRandom<float>(size_t(rows) * heads * head_dim, generator, 1.0f);
  std::vector<int32_t> sequences, positions;
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < rows_per_sequence; ++r) {
      sequences.push_back(b);
      positions.push_back(context - rows_per_sequence + r);
    }
  int32_t *device_sequences, *device_positions;
  CHECK(cudaMalloc(&device_sequences, rows * sizeof(int32_t)));
  CHECK(cudaMalloc(&device_positions, rows * sizeof(int32_t)));
  CHECK(cudaMemcpy(device_sequences, sequences.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(device_positions, positions.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
  void* workspace;
  CHECK(cudaMalloc(&workspace, kvplan::cuda::attention_workspace_bytes(rows, heads, kv_heads, head_dim, max_context)));
  __nv_bfloat16* out;
  CHECK(cudaMalloc(&out, size_t(rows) * heads * head_dim * sizeof(__nv_bfloat16)));

  const float scale = 1.0f / std::sqrt(float(head_dim));
  auto call = [&](int copy, cudaStream_t stream) {
    CHECK(kvplan::cuda::attention(q, device_sequences, device_positions, rows, heads, kv_heads, head_dim, max_context,
                                  k_caches[copy], v_caches[copy], scale, 0, max_context, workspace, out, stream));
  };
  const int calls = std::max(copies, 8);
  DenseTiming timing;
  timing.cold_us = GraphMicrosecondsPerCall(calls, [&](int i, cudaStream_t stream) { call(i % copies, stream); });
  timing.hot_us = GraphMicrosecondsPerCall(calls, [&](int, cudaStream_t stream) { call(0, stream); });
  for (int c = 0; c < copies; ++c) {
    CHECK(cudaFree(k_caches[c]));
    CHECK(cudaFree(v_caches[c]));
  }
  for (void* buffer : {static_cast<void*>(q), static_cast<void*>(device_sequences),
                       static_cast<void*>(device_positions), workspace, static_cast<void*>(out)})
    CHECK(cudaFree(buffer));
  return timing;
}

}  // namespace

constexpr int kHeads = 32, kKvHeads = 8, kHeadDim = 128, kAtoms = 1024, kKeySparsity = 8, kValueSparsity = 8;
constexpr int kCodingWindow = 64;

template <typename T>
T* DeviceCopy(const std::vector<T>& host) {
  T* device;
  CHECK(cudaMalloc(&device, std::max<size_t>(host.size(), 1) * sizeof(T)));
  CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

// One decode row over a coded layer of one sequence: every KV head holds `context` tokens, the newest
// kCodingWindow dense and the rest as codes. Median microseconds per call (eager launches, events around each).
float TimeCodedAttention(int context, bool keys_after_rope, std::mt19937& generator) {
  using namespace kvplan;
  const int coded = context - kCodingWindow;
  std::vector<int32_t> dense_begin, coded_begin, dense_count(kKvHeads, kCodingWindow), coded_count(kKvHeads, coded);
  std::vector<int32_t> dense_positions, coded_positions;
  for (int h = 0; h <= kKvHeads; ++h) {
    dense_begin.push_back(h * kCodingWindow);
    coded_begin.push_back(h * coded);
  }
  for (int h = 0; h < kKvHeads; ++h) {
    for (int p = 0; p < coded; ++p) coded_positions.push_back(p);
    for (int p = coded; p < context; ++p) dense_positions.push_back(p);
  }
  std::normal_distribution<float> normal(0.0f, 0.5f);
  auto codes = [&](size_t n) {
    std::vector<uint32_t> packed(n);
    for (uint32_t& code : packed)
      code = PackCode(uint16_t(generator() % kAtoms), __half_as_ushort(__float2half(normal(generator))));
    return packed;
  };
  const float scale = 1.0f / std::sqrt(float(kHeadDim));
  std::vector<float> inv_freq(kHeadDim / 2);
  for (int i = 0; i < kHeadDim / 2; ++i) inv_freq[i] = float(std::pow(500000.0, -2.0 * i / kHeadDim));
  const CompressedLayer layer{.head_slots = kKvHeads,
                              .kv_heads = kKvHeads,
                              .head_dim = kHeadDim,
                              .key_sparsity = kKeySparsity,
                              .value_sparsity = kValueSparsity,
                              .dense_begin = DeviceCopy(dense_begin),
                              .dense_count = DeviceCopy(dense_count),
                              .dense_keys = reinterpret_cast<uint16_t*>(DeviceRandom<__nv_bfloat16>(
                                  size_t(kKvHeads) * kCodingWindow * kHeadDim, generator, 1.0f)),
                              .dense_values = reinterpret_cast<uint16_t*>(DeviceRandom<__nv_bfloat16>(
                                  size_t(kKvHeads) * kCodingWindow * kHeadDim, generator, 1.0f)),
                              .dense_positions = DeviceCopy(dense_positions),
                              .coded_begin = DeviceCopy(coded_begin),
                              .coded_count = DeviceCopy(coded_count),
                              .key_codes = DeviceCopy(codes(size_t(kKvHeads) * coded * kKeySparsity)),
                              .value_codes = DeviceCopy(codes(size_t(kKvHeads) * coded * kValueSparsity)),
                              .coded_positions = DeviceCopy(coded_positions)};
  const CodingTables tables{.atoms = kAtoms,
                            .key_atoms = DeviceRandom<float>(size_t(kAtoms) * kHeadDim, generator, scale),
                            .value_atoms = DeviceRandom<float>(size_t(kAtoms) * kHeadDim, generator, scale),
                            .keys_after_rope = keys_after_rope,
                            .inv_freq = DeviceCopy(inv_freq)};
  const std::vector<int32_t> zero = {0}, position = {context}, row_begin = {0, 1};
  const StepRowsView step{.rows = 1,
                          .row_sequence = DeviceCopy(zero),
                          .row_position = DeviceCopy(position),
                          .sequences = 1,
                          .sequence = DeviceCopy(zero),
                          .row_begin = DeviceCopy(row_begin)};
  const cuda::CompressedAttentionShape shape{.heads = kHeads, .scale = scale, .max_region = context + 1};
  float* q = DeviceRandom<float>(kHeads * kHeadDim, generator, 1.0f);
  __nv_bfloat16* out;
  void* workspace;
  CHECK(cudaMalloc(&out, kHeads * kHeadDim * sizeof(__nv_bfloat16)));
  CHECK(cudaMalloc(&workspace, cuda::compressed_attention_workspace_bytes(shape, 1, kKvHeads, kHeadDim)));
  const float us = MedianMicroseconds([&] {
    CHECK(cuda::compressed_attention(layer, &tables, step, nullptr, shape, q, out, nullptr, workspace, nullptr));
  });
  for (const void* buffer : {static_cast<const void*>(layer.dense_begin),
                             static_cast<const void*>(layer.dense_count),
                             static_cast<const void*>(layer.dense_keys),
                             static_cast<const void*>(layer.dense_values),
                             static_cast<const void*>(layer.dense_positions),
                             static_cast<const void*>(layer.coded_begin),
                             static_cast<const void*>(layer.coded_count),
                             static_cast<const void*>(layer.key_codes),
                             static_cast<const void*>(layer.value_codes),
                             static_cast<const void*>(layer.coded_positions),
                             static_cast<const void*>(tables.key_atoms),
                             static_cast<const void*>(tables.value_atoms),
                             static_cast<const void*>(tables.inv_freq),
                             static_cast<const void*>(step.row_sequence),
                             static_cast<const void*>(step.row_position),
                             static_cast<const void*>(step.sequence),
                             static_cast<const void*>(step.row_begin),
                             static_cast<const void*>(q),
                             static_cast<const void*>(out),
                             static_cast<const void*>(workspace)})
    CHECK(cudaFree(const_cast<void*>(buffer)));
  return us;
}

int main(int argc, char** argv) {
  using namespace kvplan;
  std::vector<int> contexts = {4096, 32768};
  if (argc > 1) {
    contexts.clear();
    for (int i = 1; i < argc; ++i) contexts.push_back(std::atoi(argv[i]));
  }
  std::mt19937 generator(3);
  std::printf("dense bf16 split-KV, per call (cold: every call reads HBM; hot: one cache, repeated)\n");
  std::printf("%6s %5s %8s %12s %10s %10s %10s %10s %10s\n", "batch", "rows", "context", "max_context", "MB read",
              "cold us", "cold GB/s", "hot us", "hot GB/s");
  for (int context : contexts) {
    const size_t cache_values = size_t(kKvHeads) * context * kHeadDim;
    const std::vector<__nv_bfloat16> host_k = HostRandomBf16(cache_values, generator);
    const std::vector<__nv_bfloat16> host_v = HostRandomBf16(cache_values, generator);
    // Prefill rows each read the whole cache, so they run only at short contexts.
    std::vector<std::pair<int, int>> batches_and_rows = {{1, 1}, {16, 1}};
    if (context <= 8192) batches_and_rows.push_back({1, 512});
    for (auto [batch, rows_per_sequence] : batches_and_rows) {
      for (int max_context : {context, 4 * context}) {
        const DenseTiming timing = TimeDenseAttention(batch, rows_per_sequence, context, max_context, kHeads, kKvHeads,
                                                      kHeadDim, host_k, host_v, generator);
        const double mb = batch * kKvHeads * HeadBytes(LayerPolicy{}, kHeadDim, {.dense = context}) / 1e6;
        std::printf("%6d %5d %8d %12d %10.2f %10.1f %10.0f %10.1f %10.0f\n", batch, batch * rows_per_sequence, context,
                    max_context, mb, timing.cold_us, mb / timing.cold_us * 1e3, timing.hot_us,
                    mb / timing.hot_us * 1e3);
      }
    }
  }

  std::printf("\ncoded layer (CSR %d+%d pairs over %d atoms, 64 newest dense), batch 1\n%8s %12s %14s %14s\n",
              kKeySparsity, kValueSparsity, kAtoms, "context", "MB read", "pre-RoPE us", "post-RoPE us");
  for (int context : contexts) {
    const float pre_rope_us = TimeCodedAttention(context, false, generator);
    const float post_rope_us = TimeCodedAttention(context, true, generator);
    LayerPolicy coded_layer;
    coded_layer.coding = CodingPolicy{.key_sparsity = kKeySparsity, .value_sparsity = kValueSparsity};
    const double mb =
        kKvHeads * HeadBytes(coded_layer, kHeadDim, {.dense = kCodingWindow, .coded = context - kCodingWindow}) / 1e6;
    std::printf("%8d %12.2f %14.1f %14.1f\n", context, mb, pre_rope_us, post_rope_us);
  }
  return 0;
}
