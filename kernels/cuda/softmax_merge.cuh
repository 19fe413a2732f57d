// Shared by the attention kernels: combining the online-softmax states that separate warps built over
// disjoint cache entries.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>

#include "kernels/cuda/vector_loads.cuh"

namespace kvplan::cuda {

// --- A warp walking a cache in tiles: lane groups of kLanesPerEntry lanes each own one entry and kWidth of its
// dimensions, kUnroll entries per tile, one running online-softmax state per query head of the GQA group.

// query . key over the entry's dimensions, summed across the lane group.
template <int kLanesPerEntry, int kWidth>
__device__ __forceinline__ float lane_group_dot(const float (&query)[kWidth], const float (&key)[kWidth]) {
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kWidth; ++i) dot += query[i] * key[i];
#pragma unroll
  for (int offset = kLanesPerEntry / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
  return dot;
}

// Raises each running max to the tile's (scores [kUnroll][kGroup], -INFINITY for entries not seen), rescaling
// the running sum and accumulators once per tile rather than once per entry.
template <int kUnroll, int kGroup, int kWidth>
__device__ __forceinline__ void rescale_to_tile(const float (&score)[kUnroll][kGroup], float (&running_max)[kGroup],
                                                float (&running_sum)[kGroup], float (&acc)[kGroup][kWidth]) {
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    float tile_max = score[0][g];
#pragma unroll
    for (int u = 1; u < kUnroll; ++u) tile_max = fmaxf(tile_max, score[u][g]);
    const float new_max = fmaxf(running_max[g], tile_max);
    const float correction = __expf(running_max[g] - new_max);
    running_max[g] = new_max;
    running_sum[g] *= correction;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) acc[g][i] *= correction;
  }
}

// Adds the tile's values (8 bf16 dimensions per lane, as loaded) with their softmax weights at the running max.
template <int kUnroll, int kGroup>
__device__ __forceinline__ void add_tile_values(const float (&score)[kUnroll][kGroup],
                                                const uint4 (&value_bits)[kUnroll], const float (&running_max)[kGroup],
                                                float (&running_sum)[kGroup], float (&acc)[kGroup][8]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    float value[8];
    unpack_bf16x8(value_bits[u], value);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float weight = __expf(score[u][g] - running_max[g]);
      running_sum[g] += weight;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] += weight * value[i];
    }
  }
}

// Merges the states of a warp's entry slots (lane groups), with the usual max-rescaling, so every lane group
// ends with the warp's state for its dimensions.
template <int kLanesPerEntry, int kGroup, int kWidth>
__device__ __forceinline__ void merge_entry_slots(float (&running_max)[kGroup], float (&running_sum)[kGroup],
                                                  float (&acc)[kGroup][kWidth]) {
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
      for (int i = 0; i < kWidth; ++i)
        acc[g][i] = acc[g][i] * mine + __shfl_xor_sync(0xffffffff, acc[g][i], offset) * theirs;
      running_max[g] = new_max;
    }
  }
}

struct SoftmaxState {
  float max;
  float sum;
  float acc;  // unnormalised output for one dimension
};

// The online-softmax states of a block's warps, in shared memory: each warp publishes its running max and sum
// per query head of the group and writes its accumulators (in whatever dimension order its lanes own), then
// merge() combines the warps for one (head, dimension).
template <int kWarps, int kGroup, int kHeadDim>
struct WarpSoftmaxStates {
  float max[kWarps][kGroup];
  float sum[kWarps][kGroup];
  float acc[kWarps][kGroup][kHeadDim];

  __device__ void publish(int warp, int lane, const float (&running_max)[kGroup], const float (&running_sum)[kGroup]) {
    if (lane != 0) return;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      max[warp][g] = running_max[g];
      sum[warp][g] = running_sum[g];
    }
  }

  // A warp's state after merge_entry_slots, from the lanes of its first lane group: each owns 8 dimensions from
  // dim_base (16-byte aligned, so the stores are float4).
  __device__ void publish_lane_group(int warp, int lane, int dim_base, const float (&running_max)[kGroup],
                                     const float (&running_sum)[kGroup], const float (&acc)[kGroup][8]) {
    publish(warp, lane, running_max, running_sum);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float4* target = reinterpret_cast<float4*>(&this->acc[warp][g][dim_base]);
      target[0] = float4{acc[g][0], acc[g][1], acc[g][2], acc[g][3]};
      target[1] = float4{acc[g][4], acc[g][5], acc[g][6], acc[g][7]};
    }
  }

  // Query head g of the group, dimension d; each warp's state rescaled to the common max.
  __device__ SoftmaxState merge(int g, int d) const {
    SoftmaxState merged{-FLT_MAX, 0.0f, 0.0f};
    for (int w = 0; w < kWarps; ++w) merged.max = fmaxf(merged.max, max[w][g]);
    for (int w = 0; w < kWarps; ++w) {
      const float factor = sum[w][g] > 0.0f ? __expf(max[w][g] - merged.max) : 0.0f;
      merged.sum += sum[w][g] * factor;
      merged.acc += acc[w][g][d] * factor;
    }
    return merged;
  }
};

}  // namespace kvplan::cuda
