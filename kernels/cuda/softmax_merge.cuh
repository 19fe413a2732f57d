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

// Merges the kWarps states of query head g, dimension d (each rescaled to the common max).
template <int kWarps, int kGroup, int kHeadDim>
__device__ inline SoftmaxState merge_warp_states(const float (&max)[kWarps][kGroup], const float (&sum)[kWarps][kGroup],
                                                 const float (&acc)[kWarps][kGroup][kHeadDim], int g, int d) {
  SoftmaxState merged{-FLT_MAX, 0.0f, 0.0f};
  for (int w = 0; w < kWarps; ++w) merged.max = fmaxf(merged.max, max[w][g]);
  for (int w = 0; w < kWarps; ++w) {
    const float factor = sum[w][g] > 0.0f ? __expf(max[w][g] - merged.max) : 0.0f;
    merged.sum += sum[w][g] * factor;
    merged.acc += acc[w][g][d] * factor;
  }
  return merged;
}

}  // namespace kvplan::cuda
