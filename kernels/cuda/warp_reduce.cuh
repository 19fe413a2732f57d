// Reductions across the 32 lanes of a warp, in the one butterfly order every kernel uses (xor offsets 16 to 1), so
// every lane ends with the same result.
#pragma once

#include <cuda_runtime.h>

namespace kvplan::cuda {
namespace {

__device__ inline float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

__device__ inline float warp_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffff, value, offset));
  return value;
}

}  // namespace
}  // namespace kvplan::cuda
