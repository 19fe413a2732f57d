// Wide loads the attention kernels share: eight bf16 values from one 16-byte word, and n consecutive floats in as
// few loads as the vector widths allow.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace kvplan::cuda {
namespace {

__device__ inline void unpack_bf16x8(const uint4& raw, float* out) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// n consecutive floats at a 4n-byte aligned address.
template <int n>
__device__ inline void load_floats(const float* source, float* out) {
  if constexpr (n == 1) {
    out[0] = *source;
  } else if constexpr (n == 2) {
    const float2 pair = *reinterpret_cast<const float2*>(source);
    out[0] = pair.x;
    out[1] = pair.y;
  } else {
#pragma unroll
    for (int i = 0; i < n; i += 4) {
      const float4 quad = *reinterpret_cast<const float4*>(source + i);
      out[i] = quad.x;
      out[i + 1] = quad.y;
      out[i + 2] = quad.z;
      out[i + 3] = quad.w;
    }
  }
}

}  // namespace
}  // namespace kvplan::cuda
