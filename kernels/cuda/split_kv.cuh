// Split-KV (flash-decoding) plumbing shared by the attention kernels: the pass that combines the per-split partial
// softmax states (split_kv.h: how many splits a launch uses and where their states live in the workspace).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "kernels/cuda/split_kv.h"

namespace kvplan::cuda {
namespace {

// Grid (heads, rows), one thread per output dimension: the splits' states merged into the bf16 output and, with
// row_stats non-null ([rows, heads, 2]), the row's softmax max and sum.
__global__ void combine_partials_kernel(PartialView partial, int heads, int head_dim, int splits, __nv_bfloat16* out,
                                        float* row_stats) {
  const int head = blockIdx.x, row = blockIdx.y;
  const int64_t base = (int64_t(row) * heads + head) * splits;
  float global_max = -FLT_MAX;
  for (int s = 0; s < splits; ++s)
    if (partial.sum[base + s] > 0.0f) global_max = fmaxf(global_max, partial.max[base + s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float total_sum = 0.0f, total = 0.0f;
    for (int s = 0; s < splits; ++s) {
      if (partial.sum[base + s] <= 0.0f) continue;
      const float factor = __expf(partial.max[base + s] - global_max);
      total_sum += partial.sum[base + s] * factor;
      total += partial.acc[(base + s) * head_dim + d] * factor;
    }
    out[(int64_t(row) * heads + head) * head_dim + d] = __float2bfloat16(total_sum > 0.0f ? total / total_sum : 0.0f);
    if (d == 0 && row_stats != nullptr) {
      row_stats[(int64_t(row) * heads + head) * 2] = global_max;
      row_stats[(int64_t(row) * heads + head) * 2 + 1] = total_sum;
    }
  }
}

inline cudaError_t combine_partials(const PartialView& partial, int rows, int heads, int head_dim, int splits,
                                    __nv_bfloat16* out, float* row_stats, cudaStream_t stream) {
  combine_partials_kernel<<<dim3(heads, rows), head_dim, 0, stream>>>(partial, heads, head_dim, splits, out, row_stats);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kvplan::cuda
