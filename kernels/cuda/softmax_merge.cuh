// Shared by the attention kernels: combining the online-softmax states that separate warps built over
// disjoint cache entries.
#pragma once

#include <cfloat>

namespace kvplan::cuda {

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
