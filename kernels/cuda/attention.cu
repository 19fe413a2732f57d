#include <cfloat>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kVector = 8;  // bf16 elements per 16-byte load
constexpr int kMaxGroup = 8;

// Everything one launch of the partial kernel reads; passed by value to keep the dispatch tables short.
struct PartialParams {
  const float* q;
  const int32_t* row_sequence;
  const int32_t* row_position;
  int heads, kv_heads, capacity;
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  float scale;
  int sliding_window, chunk, splits;
};

__device__ inline void load_bf16x8(const __nv_bfloat16* source, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(source);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Grid (splits, kv_heads, rows). A group of kHeadDim/8 lanes owns one cache entry at a time (one 16-byte load
// each for K and V), so a warp walks 256/kHeadDim entries per step, and every query head of the GQA group reuses
// the loaded K/V: the cache is read once per split.
template <int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kWarps * 32)
    attention_partial_kernel(const PartialParams p, const PartialView partial) {
  constexpr int kLanesPerEntry = kHeadDim / kVector;
  constexpr int kEntriesPerWarp = 32 / kLanesPerEntry;
  const int split = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
  const int heads = p.heads, group = p.heads / p.kv_heads, splits = p.splits;
  const int position = p.row_position[row];
  int begin = split * p.chunk;
  const int end = min(begin + p.chunk, position + 1);
  if (p.sliding_window > 0) begin = max(begin, position - p.sliding_window + 1);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int entry_slot = lane / kLanesPerEntry, dim_base = (lane % kLanesPerEntry) * kVector;

  float query[kGroup][kVector], acc[kGroup][kVector], running_max[kGroup], running_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    running_max[g] = -FLT_MAX;
    running_sum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      acc[g][i] = 0.0f;
      query[g][i] =
          g < group ? p.q[(int64_t(row) * heads + kv_head * group + g) * kHeadDim + dim_base + i] * p.scale : 0.0f;
    }
  }

  const int64_t head_offset = (int64_t(p.row_sequence[row]) * p.kv_heads + kv_head) * p.capacity * kHeadDim;
  for (int warp_begin = begin + warp * kEntriesPerWarp; warp_begin < end; warp_begin += kWarps * kEntriesPerWarp) {
    const int entry = warp_begin + entry_slot;
    const bool valid = entry < end;
    float key[kVector], value[kVector];
    if (valid) {
      load_bf16x8(p.k_cache + head_offset + int64_t(entry) * kHeadDim + dim_base, key);
      load_bf16x8(p.v_cache + head_offset + int64_t(entry) * kHeadDim + dim_base, value);
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float dot = 0.0f;
      if (valid) {
#pragma unroll
        for (int i = 0; i < kVector; ++i) dot += query[g][i] * key[i];
      }
#pragma unroll
      for (int offset = kLanesPerEntry / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
      if (valid) {
        const float new_max = fmaxf(running_max[g], dot);
        const float correction = __expf(running_max[g] - new_max), weight = __expf(dot - new_max);
        running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
        for (int i = 0; i < kVector; ++i) acc[g][i] = acc[g][i] * correction + weight * value[i];
        running_max[g] = new_max;
      }
    }
  }

  // Merge the entry slots of the warp, then the warps of the block, with the usual max-rescaling.
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int offset = kLanesPerEntry; offset < 32; offset *= 2) {
      const float other_max = __shfl_xor_sync(0xffffffff, running_max[g], offset);
      const float other_sum = __shfl_xor_sync(0xffffffff, running_sum[g], offset);
      const float new_max = fmaxf(running_max[g], other_max);
      const float mine = __expf(running_max[g] - new_max), theirs = __expf(other_max - new_max);
      running_sum[g] = running_sum[g] * mine + other_sum * theirs;
#pragma unroll
      for (int i = 0; i < kVector; ++i)
        acc[g][i] = acc[g][i] * mine + __shfl_xor_sync(0xffffffff, acc[g][i], offset) * theirs;
      running_max[g] = new_max;
    }
  }
  __shared__ WarpSoftmaxStates<kWarps, kGroup, kHeadDim> states;
  if (lane < kLanesPerEntry) {
    states.publish(warp, lane, running_max, running_sum);
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
#pragma unroll
      for (int i = 0; i < kVector; ++i) states.acc[warp][g][dim_base + i] = acc[g][i];
  }
  __syncthreads();
  for (int index = threadIdx.x; index < group * kHeadDim; index += blockDim.x) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    const SoftmaxState merged = states.merge(g, d);
    const int64_t slot = (int64_t(row) * heads + kv_head * group + g) * splits + split;
    partial.acc[slot * kHeadDim + d] = merged.acc;
    if (d == 0) {
      partial.max[slot] = merged.max;
      partial.sum[slot] = merged.sum;
    }
  }
}

template <int kHeadDim>
void launch_partial(dim3 grid, cudaStream_t stream, const PartialParams& params, const PartialView& partial) {
  const int group = params.heads / params.kv_heads;
  constexpr int kThreads = kWarps * 32;
  if (group == 1)
    attention_partial_kernel<kHeadDim, 1><<<grid, kThreads, 0, stream>>>(params, partial);
  else if (group == 2)
    attention_partial_kernel<kHeadDim, 2><<<grid, kThreads, 0, stream>>>(params, partial);
  else if (group <= 4)
    attention_partial_kernel<kHeadDim, 4><<<grid, kThreads, 0, stream>>>(params, partial);
  else
    attention_partial_kernel<kHeadDim, kMaxGroup><<<grid, kThreads, 0, stream>>>(params, partial);
}

}  // namespace

bool attention_supported(int heads, int kv_heads, int head_dim) {
  const bool head_dim_ok = head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return head_dim_ok && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup;
}

size_t attention_workspace_bytes(int rows, int heads, int head_dim, int max_context) {
  return partial_workspace_bytes(rows, heads, head_dim, max_context);
}

cudaError_t attention(const float* q, const int32_t* row_sequence, const int32_t* row_position, int rows, int heads,
                      int kv_heads, int head_dim, int capacity, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, float scale, int sliding_window, int max_context, void* workspace,
                      __nv_bfloat16* out, cudaStream_t stream) {
  if (!attention_supported(heads, kv_heads, head_dim)) return cudaErrorNotSupported;
  if (rows == 0) return cudaSuccess;
  const int splits = split_count(rows, kv_heads, max_context);
  const int chunk = (max_context + splits - 1) / splits;
  const PartialView partial = partial_view(workspace, rows, heads, splits);
  const dim3 grid(splits, kv_heads, rows);
  const PartialParams params{q,       row_sequence, row_position, heads,          kv_heads, capacity,
                             k_cache, v_cache,      scale,        sliding_window, chunk,    splits};
  switch (head_dim) {
    case 32: launch_partial<32>(grid, stream, params, partial); break;
    case 64: launch_partial<64>(grid, stream, params, partial); break;
    case 128: launch_partial<128>(grid, stream, params, partial); break;
    default: launch_partial<256>(grid, stream, params, partial);
  }
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  return combine_partials(partial, rows, heads, head_dim, splits, out, stream);
}

}  // namespace kvplan::cuda
