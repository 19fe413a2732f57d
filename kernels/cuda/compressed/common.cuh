// Device helpers the compressed layer's kernels share (kernels/compressed_layout.h): a step's head slots, the number
// formats of the entries, RoPE factors, block-wide selection, the moves that compact a region, and the prefetch and
// programmatic-dependent-launch primitives of the attention chain (its asynchronous copies are async_copy.cuh's,
// shared with the tensor-core prefill). Everything here is used by more than one file of kernels/cuda/compressed/;
// what one file alone uses stays in that file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {
namespace {

constexpr int kBlock = 256;  // threads of the per-head kernels

__device__ inline int64_t head_slot(const CompressedLayer& layer, const StepRowsView& step, int j, int kv_head) {
  return int64_t(step.sequence[j]) * layer.kv_heads + kv_head;
}

__device__ inline int32_t step_length(const StepRowsView& step, int j) {
  return step.row_position[step.row_begin[j + 1] - 1] + 1;
}

__device__ inline float bf16_value(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
__device__ inline uint16_t bf16_bits(float value) { return __bfloat16_as_ushort(__float2bfloat16(value)); }
__device__ inline float code_coefficient(uint32_t code) { return __half2float(__ushort_as_half(uint16_t(code >> 16))); }
__device__ inline uint32_t code_atom(uint32_t code) { return code & 0xffff; }
// fp16 as the CPU stores coefficients: round to nearest even, saturating at the largest finite value.
__device__ inline uint16_t saturated_fp16_bits(float value) {
  return __half_as_ushort(__float2half_rn(fminf(fmaxf(value, -65504.0f), 65504.0f)));
}
__device__ inline float fp16_value(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// A quantized vector's scale and minimum (word 0, kernels/compressed_layout.h).
struct QuantizedRange {
  float scale, minimum;
};
__device__ inline QuantizedRange quantized_range_of(uint32_t word) {
  return {fp16_value(uint16_t(word & 0xffff)), fp16_value(uint16_t(word >> 16))};
}
__device__ inline QuantizedRange quantized_range(const uint32_t* words) { return quantized_range_of(words[0]); }
// A level as cpu::dequantize_vector rounds it: a multiply and an add, not fused.
__device__ inline float dequantized_level(const QuantizedRange& range, uint32_t level) {
  return __fadd_rn(range.minimum, __fmul_rn(range.scale, float(level)));
}
// Channel d of a quantized vector, times its channel scale where given.
__device__ inline float dequantized_channel(const uint32_t* words, const QuantizedRange& range, int d, int bits,
                                            const float* channel_scale) {
  const float value = dequantized_level(range, QuantizedLevel(words, d, bits));
  return channel_scale != nullptr ? __fmul_rn(value, channel_scale[d]) : value;
}

// cos and sin of position * inv_freq as cpu::apply_rope forms them (double angle), scaled by the YaRN factor.
__device__ inline void rope_factors(int32_t position, float inv_freq, float attention_factor, float& c, float& s) {
  double sin_angle, cos_angle;
  sincos(double(position) * inv_freq, &sin_angle, &cos_angle);
  c = float(cos_angle) * attention_factor;
  s = float(sin_angle) * attention_factor;
}

// Floats as unsigned keys that order like the floats.
__device__ inline uint32_t ordered_bits(float value) {
  const uint32_t bits = __float_as_uint(value);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

// The largest valid key (0 when none is valid).
template <typename KeyOf>
__device__ uint64_t block_largest(int n, KeyOf key_of) {
  __shared__ unsigned long long warp_largest[kBlock / 32];
  unsigned long long largest = 0;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    uint64_t key;
    if (key_of(e, key)) largest = max(largest, (unsigned long long)key);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) largest = max(largest, __shfl_xor_sync(0xffffffff, largest, offset));
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_largest[threadIdx.x / 32] = largest;
  __syncthreads();
  for (int w = 0; w < (int(blockDim.x) + 31) / 32; ++w) largest = max(largest, warp_largest[w]);
  return largest;
}

// The k-th largest (1 <= k <= valid keys) of the keys key_of(e, &key) reports valid for e in [0, n), by radix
// selection one byte at a time from the top. Keys must be unique, so exactly k keys are >= the result. Every
// thread of the block calls it and gets the result.
template <typename KeyOf>
__device__ uint64_t block_kth_largest(int n, int k, KeyOf key_of) {
  if (k == 1) return block_largest(n, key_of);  // a decode step's usual eviction: one pass, not eight
  __shared__ unsigned histogram[256];
  __shared__ uint64_t shared_prefix;
  __shared__ int shared_remaining;
  uint64_t prefix = 0;
  int remaining = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0;
    __syncthreads();
    const uint64_t decided = shift == 56 ? 0 : ~0ull << (shift + 8);
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      uint64_t key;
      if (!key_of(e, key) || (key & decided) != prefix) continue;
      atomicAdd(&histogram[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int bin = 255;
      for (; bin > 0 && int(histogram[bin]) < remaining; --bin) remaining -= int(histogram[bin]);
      shared_prefix = prefix | (uint64_t(bin) << shift);
      shared_remaining = remaining;
    }
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    __syncthreads();
  }
  return prefix;
}

// --- Per-slot moves shared by eviction and coding --------------------------------------------------------------

__device__ void move_dense_slots(const CompressedLayer& layer, const int* from, const int* to, int moves,
                                 int64_t base) {
  const int hd = layer.head_dim;
  for (int index = threadIdx.x; index < moves * hd; index += blockDim.x) {
    const int64_t source = base + from[index / hd], target = base + to[index / hd];
    const int d = index % hd;
    layer.dense_keys[target * hd + d] = layer.dense_keys[source * hd + d];
    layer.dense_values[target * hd + d] = layer.dense_values[source * hd + d];
    if (d != 0) continue;
    layer.dense_positions[target] = layer.dense_positions[source];
    if (layer.dense_scores) layer.dense_scores[target] = layer.dense_scores[source];
    if (layer.dense_selected) layer.dense_selected[target] = layer.dense_selected[source];
  }
}

// cpu::CompactionMoves for a region of `live` slots whose removed slots are `removed` (ascending, count of them):
// fills from[] / to[] (shared, kMaxEvictionsPerStep each) and returns the number of moves. All threads call it.
__device__ int compaction_moves(const int* removed, int count, int live, int* from, int* to) {
  __shared__ uint8_t removed_tail[kMaxEvictionsPerStep];  // removed marks of slots [live - count, live)
  __shared__ int moves;
  const int remaining = live - count;
  for (int t = threadIdx.x; t < count; t += blockDim.x) removed_tail[t] = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < count; t += blockDim.x)
    if (removed[t] >= remaining) removed_tail[removed[t] - remaining] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    int holes = 0, movers = 0;
    while (holes < count && removed[holes] < remaining) to[holes] = removed[holes], ++holes;
    for (int t = 0; t < count; ++t)
      if (!removed_tail[t]) from[movers++] = remaining + t;
    moves = holes;  // == movers: every hole below `remaining` is matched by a survivor at or past it
  }
  __syncthreads();
  return moves;
}

// The vectors a coding launch codes: the first counts[g] (all when counts is null) of each group of group_size.
struct CodingRows {
  int groups, group_size;
  const int32_t* counts;
  __host__ __device__ int64_t vectors() const { return int64_t(groups) * group_size; }
  __device__ bool coded(int64_t vector) const {
    if (vector >= vectors()) return false;
    return counts == nullptr || vector % group_size < counts[vector / group_size];
  }
};

// --- The attention chain: prefetches and programmatic dependent launch ----------------------------------------------

// Programmatic dependent launch: the next kernel of the chain (launched by launch_dependent) may start its prologue,
// which reads nothing this kernel writes, once every block of this one has allowed it; it waits for this kernel's
// completion, and the visibility of its writes, before reading them.
__device__ inline void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ inline void wait_for_prerequisite() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

__device__ inline void prefetch_to_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(address));
}

// Launches `kernel` as a programmatic dependent of the kernel before it in the stream: it may start once every block
// of that kernel has called allow_dependent_launch(), and calls wait_for_prerequisite() before reading its results.
// This hides most of a launch and the prologue of each kernel of the chain behind the one before.
template <typename Kernel, typename Arguments>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                             const Arguments& arguments) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, arguments);
}

}  // namespace
}  // namespace kvplan::cuda
