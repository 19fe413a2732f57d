// Decode-attention kernels at real scale (Llama-3-8B heads: 32 query / 8 KV heads, head_dim 128), one layer:
// the dense bf16 split-KV kernel against the sparse-coded kernel (keys and values as atom/coefficient pairs,
// RoPE applied on the fly). Prints median microseconds and the bytes each read per call.
//   build-cuda/bench/kernel_bench [contexts...]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
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

}  // namespace

int main(int argc, char** argv) {
  using namespace kvplan;
  constexpr int kHeads = 32, kKvHeads = 8, kHeadDim = 128, kAtoms = 1024, kKeySparsity = 8, kValueSparsity = 8;
  std::vector<int> contexts = {4096, 32768};
  if (argc > 1) {
    contexts.clear();
    for (int i = 1; i < argc; ++i) contexts.push_back(std::atoi(argv[i]));
  }
  std::mt19937 generator(3);
  std::printf("%8s %14s %12s %14s %12s %10s\n", "context", "dense us", "dense MB", "sparse us", "sparse MB",
              "dense GB/s");
  for (int context : contexts) {
    const float scale = 1.0f / std::sqrt(float(kHeadDim));
    float* q = DeviceRandom<float>(kHeads * kHeadDim, generator, 1.0f);
    int32_t zero = 0, position = context - 1;
    int32_t *sequence, *positions;
    CHECK(cudaMalloc(&sequence, 4));
    CHECK(cudaMalloc(&positions, 4));
    CHECK(cudaMemcpy(sequence, &zero, 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(positions, &position, 4, cudaMemcpyHostToDevice));
    const size_t cache = size_t(kKvHeads) * context * kHeadDim;
    __nv_bfloat16* k_cache = DeviceRandom<__nv_bfloat16>(cache, generator, 1.0f);
    __nv_bfloat16* v_cache = DeviceRandom<__nv_bfloat16>(cache, generator, 1.0f);
    void* workspace;
    CHECK(cudaMalloc(&workspace, cuda::attention_workspace_bytes(1, kHeads, kHeadDim, context)));
    __nv_bfloat16* dense_out;
    CHECK(cudaMalloc(&dense_out, kHeads * kHeadDim * 2));
    const float dense_us = MedianMicroseconds([&] {
      CHECK(cuda::attention(q, sequence, positions, 1, kHeads, kKvHeads, kHeadDim, context, k_cache, v_cache, scale, 0,
                            context, workspace, dense_out, nullptr));
    });

    const size_t coded = size_t(kKvHeads) * context;
    std::vector<int32_t> offsets(kKvHeads + 1), zeros(kKvHeads + 1, 0), coded_positions(coded);
    for (int h = 0; h <= kKvHeads; ++h) offsets[h] = h * context;
    for (size_t i = 0; i < coded; ++i) coded_positions[i] = int32_t(i % context);
    int32_t *d_offsets, *d_zeros, *d_positions;
    CHECK(cudaMalloc(&d_offsets, offsets.size() * 4));
    CHECK(cudaMalloc(&d_zeros, zeros.size() * 4));
    CHECK(cudaMalloc(&d_positions, coded * 4));
    CHECK(cudaMemcpy(d_offsets, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_zeros, zeros.data(), zeros.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_positions, coded_positions.data(), coded * 4, cudaMemcpyHostToDevice));
    cuda::CompressedCacheView view{d_offsets,
                                   DeviceRandom<uint16_t>(coded * kKeySparsity, generator, 0, true, kAtoms),
                                   DeviceRandom<__half>(coded * kKeySparsity, generator, 0.5f),
                                   DeviceRandom<uint16_t>(coded * kValueSparsity, generator, 0, true, kAtoms),
                                   DeviceRandom<__half>(coded * kValueSparsity, generator, 0.5f),
                                   d_positions,
                                   d_zeros,
                                   nullptr,
                                   nullptr,
                                   nullptr,
                                   nullptr};
    float* key_dictionary = DeviceRandom<float>(size_t(kAtoms) * kHeadDim, generator, scale);
    float* value_dictionary = DeviceRandom<float>(size_t(kAtoms) * kHeadDim, generator, scale);
    std::vector<float> inv_freq(kHeadDim / 2);
    for (int i = 0; i < kHeadDim / 2; ++i) inv_freq[i] = float(std::pow(500000.0, -2.0 * i / kHeadDim));
    float* d_freq;
    CHECK(cudaMalloc(&d_freq, inv_freq.size() * 4));
    CHECK(cudaMemcpy(d_freq, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
    float* sparse_out;
    CHECK(cudaMalloc(&sparse_out, kHeads * kHeadDim * 4));
    const cuda::SparseAttentionShape shape{.rows = 1,
                                           .heads = kHeads,
                                           .kv_heads = kKvHeads,
                                           .head_dim = kHeadDim,
                                           .key_sparsity = kKeySparsity,
                                           .value_sparsity = kValueSparsity,
                                           .scale = scale,
                                           .max_entries_per_head = context,
                                           .total_entries = int(coded)};
    void* sparse_workspace;
    CHECK(cudaMalloc(&sparse_workspace, cuda::sparse_attention_workspace_bytes(shape, false)));
    const float sparse_us = MedianMicroseconds([&] {
      CHECK(cuda::sparse_attention(shape, q, positions, view, key_dictionary, value_dictionary, d_freq, sparse_out,
                                   nullptr, sparse_workspace, nullptr));
    });
    LayerPolicy coded_layer;
    coded_layer.coding = CodingPolicy{.key_sparsity = kKeySparsity, .value_sparsity = kValueSparsity};
    const double dense_mb = kKvHeads * HeadBytes(LayerPolicy{}, kHeadDim, {.dense = context}) / 1e6;
    const double sparse_mb = kKvHeads * HeadBytes(coded_layer, kHeadDim, {.coded = context}) / 1e6;
    std::printf("%8d %14.1f %12.2f %14.1f %12.2f %10.0f\n", context, dense_us, dense_mb, sparse_us, sparse_mb,
                dense_mb / dense_us * 1e3);
  }
  return 0;
}
