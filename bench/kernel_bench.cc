// Decode-attention kernels at real scale (Llama-3-8B heads: 32 query / 8 KV heads, head_dim 128), one layer:
// the dense bf16 split-KV kernel against compressed layers (keys and values as atom/coefficient pairs, coded after
// or before RoPE; a token budget keeping a fifth of the tokens dense). Prints median microseconds and the bytes
// each read per call.
//   build-cuda/bench/kernel_bench [contexts...]
//
// The dense kernel runs decode rows at batch 1 and 16, and 512 prefill-like rows of one sequence, with
// max_context equal to the context and 4x it (a cache sized for a longer generation, launched once into a CUDA
// graph). Each timing replays a graph of back-to-back calls, as the layers of a decode step run, and divides by
// the calls: "cold" rotates over enough cache copies that every call reads HBM, as a real step does (each layer
// has its own cache); "hot" repeats one copy, which at small contexts then sits in L2. The compressed layers run one
// decode row at batch 1 the same way (their copies include the dictionaries), beside the dense kernel's cold time.
// Last, the matching pursuit that codes the tokens leaving the window, per call at decode and prefill shapes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda/kernels.h"
#include "plans/cache_policy.h"
#include "runtime/cuda/device_layer.h"

namespace {

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    const cudaError_t error = (call);                                                                \
    if (error != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(error)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

void CheckOk(const absl::Status& status) {
  if (status.ok()) return;
  std::fprintf(stderr, "%s\n", status.ToString().c_str());
  std::exit(1);
}

// n normal floats of standard deviation `scale`, in device memory.
float* DeviceRandom(size_t n, std::mt19937& generator, float scale) {
  std::vector<float> host(n);
  std::normal_distribution<float> normal(0.0f, scale);
  for (float& value : host) value = normal(generator);
  float* device;
  CHECK(cudaMalloc(&device, n * sizeof(float)));
  CHECK(cudaMemcpy(device, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  return device;
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
  float* q = DeviceRandom(size_t(rows) * heads * head_dim, generator, 1.0f);
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

template <typename T>
T* DeviceAlloc(size_t n) {
  T* device;
  CHECK(cudaMalloc(&device, std::max<size_t>(n, 1) * sizeof(T)));
  return device;
}

// One decode row over a compressed layer of one sequence at position context - 1: every KV head holds its newest
// `dense` tokens as bf16 entries and the `coded` before them as codes (CSR kKeySparsity + kValueSparsity pairs over
// kAtoms atoms, keys coded after RoPE or before it); a layer with merged_older also folds the tokens older than both
// into its merged slot (a budget layer's ZeroMerge). Timed as the dense kernel is: graph replays, cold (rotating
// over copies of the layer, dictionaries included, so every call reads HBM) and hot (one copy).
struct CompressedCase {
  int context, dense, coded;
  bool keys_after_rope, merged_older;
};

// Bytes attention must read per call: dense K and V and positions, codes and positions, merged slots.
double CompressedBytesRead(const CompressedCase& c) {
  const double per_head = c.dense * (2.0 * kHeadDim * 2 + 4) + c.coded * ((kKeySparsity + kValueSparsity) * 4.0 + 4) +
                          (c.merged_older ? 2.0 * kHeadDim * 4 : 0.0);
  return kKvHeads * per_head;
}

DenseTiming TimeCompressedAttention(const CompressedCase& c, std::mt19937& generator) {
  using namespace kvplan;
  const bool coding = c.coded > 0;
  std::vector<int32_t> dense_begin, coded_begin;
  for (int h = 0; h <= kKvHeads; ++h) {
    dense_begin.push_back(h * std::max(c.dense, 1));
    coded_begin.push_back(h * c.coded);
  }
  const float scale = 1.0f / std::sqrt(float(kHeadDim));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> key_atoms(size_t(kAtoms) * kHeadDim), value_atoms(key_atoms.size()), inv_freq(kHeadDim / 2);
  for (float& value : key_atoms) value = normal(generator) * scale;
  for (float& value : value_atoms) value = normal(generator) * scale;
  for (int i = 0; i < kHeadDim / 2; ++i) inv_freq[i] = float(std::pow(500000.0, -2.0 * i / kHeadDim));
  int device, l2_bytes;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const double dictionary_bytes = coding ? 2.0 * kAtoms * kHeadDim * sizeof(float) : 0.0;
  const int copies = int(std::ceil(2.0 * l2_bytes / (CompressedBytesRead(c) + dictionary_bytes)));

  const std::vector<int32_t> lengths = {c.context}, dense(kKvHeads, c.dense), coded(kKvHeads, c.coded);
  const std::vector<uint8_t> merged(kKvHeads, c.merged_older ? 1 : 0);
  int32_t *fill_lengths = DeviceCopy(lengths), *fill_dense = DeviceCopy(dense), *fill_coded = DeviceCopy(coded);
  uint8_t* fill_merged = DeviceCopy(merged);
  const CompressedArrayShape layer_shape{.head_slots = kKvHeads,
                                         .kv_heads = kKvHeads,
                                         .head_dim = kHeadDim,
                                         .key_sparsity = coding ? kKeySparsity : 0,
                                         .value_sparsity = coding ? kValueSparsity : 0,
                                         .merged = c.merged_older};
  std::vector<DeviceCompressedLayer> storage(copies);
  std::vector<CompressedLayer> layers(copies);
  std::vector<CodingTables> tables(copies);
  std::vector<void*> buffers = {fill_lengths, fill_dense, fill_coded, fill_merged};
  auto keep = [&](auto* buffer) {
    buffers.push_back(buffer);
    return buffer;
  };
  for (int copy = 0; copy < copies; ++copy) {
    CheckOk(storage[copy].Allocate(layer_shape, dense_begin, coded_begin));
    CompressedLayer& layer = layers[copy];
    layer = storage[copy].View();
    if (coding)
      tables[copy] = CodingTables{.atoms = kAtoms,
                                  .key_atoms = keep(DeviceCopy(key_atoms)),
                                  .value_atoms = keep(DeviceCopy(value_atoms)),
                                  .keys_after_rope = c.keys_after_rope,
                                  .inv_freq = keep(DeviceCopy(inv_freq))};
    CHECK(cuda::fill_compressed_noise(layer,
                                      {.lengths = fill_lengths,
                                       .dense = fill_dense,
                                       .coded = fill_coded,
                                       .merged = fill_merged,
                                       .atoms = kAtoms,
                                       .seed = uint32_t(copy)},
                                      nullptr));
  }
  const std::vector<int32_t> zero = {0}, position = {c.context - 1}, row_begin = {0, 1};
  const StepRowsView step{.rows = 1,
                          .row_sequence = keep(DeviceCopy(zero)),
                          .row_position = keep(DeviceCopy(position)),
                          .sequences = 1,
                          .sequence = keep(DeviceCopy(zero)),
                          .row_begin = keep(DeviceCopy(row_begin))};
  const cuda::CompressedAttentionShape shape{
      .heads = kHeads, .scale = scale, .merge_compensation = 1.0f, .max_region = c.dense + c.coded + 1};
  float* q = keep(DeviceRandom(kHeads * kHeadDim, generator, 1.0f));
  __nv_bfloat16* out = keep(DeviceAlloc<__nv_bfloat16>(kHeads * kHeadDim));
  const cuda::DeviceLimits limits = cuda::device_limits();
  void* workspace = keep(DeviceAlloc<char>(
      cuda::compressed_attention_workspace_bytes(shape, 1, kKvHeads, kHeadDim, coding ? kAtoms : 0, limits)));
  // Every copy has the same shape, so one plan serves them all.
  const cuda::CompressedAttentionPlan plan =
      cuda::plan_compressed_attention(layers[0], coding ? &tables[0] : nullptr, shape, 1, limits);
  CHECK(cudaDeviceSynchronize());
  auto call = [&](int copy, cudaStream_t stream) {
    CHECK(cuda::compressed_attention(layers[copy], coding ? &tables[copy] : nullptr, step, nullptr, shape, plan, q,
                                     out, nullptr, workspace, stream));
  };
  const int calls = std::max(copies, 8);
  DenseTiming timing;
  timing.cold_us = GraphMicrosecondsPerCall(calls, [&](int i, cudaStream_t stream) { call(i % copies, stream); });
  timing.hot_us = GraphMicrosecondsPerCall(calls, [&](int, cudaStream_t stream) { call(0, stream); });
  for (void* buffer : buffers) CHECK(cudaFree(buffer));
  return timing;
}

// Matching pursuit of `vectors` head vectors (dim kHeadDim, kKeySparsity atoms each) over `atoms` fp32 atoms, as
// a step codes the tokens leaving the window; cold: each call codes against another copy of the dictionary, as
// each layer has its own.
float TimeMatchingPursuit(int vectors, int atoms, std::mt19937& generator) {
  int device, l2_bytes;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const size_t dictionary_values = size_t(atoms) * kHeadDim;
  const int copies = int(std::max<size_t>(1, 2 * size_t(l2_bytes) / (dictionary_values * sizeof(float)) + 1));
  std::vector<float*> dictionaries(copies);
  for (float*& dictionary : dictionaries) dictionary = DeviceRandom(dictionary_values, generator, 1.0f);
  float* x = DeviceRandom(size_t(vectors) * kHeadDim, generator, 1.0f);
  uint32_t* codes;
  CHECK(cudaMalloc(&codes, size_t(vectors) * kKeySparsity * sizeof(uint32_t)));
  const float us = GraphMicrosecondsPerCall(std::max(copies, 8), [&](int i, cudaStream_t stream) {
    const kvplan::cuda::PursuitJob job = {dictionaries[i % copies], x, kKeySparsity, codes};
    CHECK(kvplan::cuda::matching_pursuit(&job, 1, atoms, kHeadDim, vectors, 1, nullptr, stream));
  });
  for (float* dictionary : dictionaries) CHECK(cudaFree(dictionary));
  CHECK(cudaFree(x));
  CHECK(cudaFree(codes));
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
  std::vector<float> dense_decode_us;  // batch 1, max_context = context, cold: the reference for compressed layers
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
        if (batch == 1 && rows_per_sequence == 1 && max_context == context) dense_decode_us.push_back(timing.cold_us);
        const double mb = batch * kKvHeads * HeadBytes(LayerPolicy{}, kHeadDim, {.dense = context}) / 1e6;
        std::printf("%6d %5d %8d %12d %10.2f %10.1f %10.0f %10.1f %10.0f\n", batch, batch * rows_per_sequence, context,
                    max_context, mb, timing.cold_us, mb / timing.cold_us * 1e3, timing.hot_us,
                    mb / timing.hot_us * 1e3);
      }
    }
  }

  std::printf(
      "\ncompressed layers, batch 1, one decode row, per call; coded: CSR %d+%d pairs over %d atoms, the newest %d "
      "tokens dense; budget: 20%% of the tokens dense, the rest merged. MB read: codes, positions, dense K/V, merged "
      "slots (not the dictionaries)\n%8s %-18s %10s %10s %10s %10s %14s %10s\n",
      kKeySparsity, kValueSparsity, kAtoms, kCodingWindow, "context", "layer", "MB read", "cold us", "cold GB/s",
      "hot us", "dense cold us", "speedup");
  for (size_t i = 0; i < contexts.size(); ++i) {
    const int context = contexts[i], budget_dense = context / 5;
    const std::pair<const char*, CompressedCase> cases[] = {
        {"coded after RoPE", {context, kCodingWindow, context - kCodingWindow, true, false}},
        {"coded before RoPE", {context, kCodingWindow, context - kCodingWindow, false, false}},
        {"budget 20% dense", {context, budget_dense, 0, false, true}},
    };
    for (const auto& [name, c] : cases) {
      const DenseTiming timing = TimeCompressedAttention(c, generator);
      const double mb = CompressedBytesRead(c) / 1e6;
      std::printf("%8d %-18s %10.2f %10.1f %10.0f %10.1f %14.1f %9.2fx\n", context, name, mb, timing.cold_us,
                  mb / timing.cold_us * 1e3, timing.hot_us, dense_decode_us[i], dense_decode_us[i] / timing.cold_us);
    }
  }

  std::printf("\nmatching pursuit, %d atoms of %d per vector, per call (cold dictionary)\n%8s %8s %10s\n", kKeySparsity,
              kHeadDim, "vectors", "atoms", "us");
  // A decode step at batch 1 and 16 (one vector per KV head and sequence), a 128-row prefill pass.
  for (int vectors : {kKvHeads, 16 * kKvHeads, 128 * kKvHeads})
    for (int atoms : {1024, 4096})
      std::printf("%8d %8d %10.1f\n", vectors, atoms, TimeMatchingPursuit(vectors, atoms, generator));
  return 0;
}
