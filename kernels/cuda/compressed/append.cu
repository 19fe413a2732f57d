// compressed_append (the oracle: cpu/compressed/append.cc): RoPE, key-norm scores and the append into the dense
// region, one block per (step sequence, KV head).
#include <cstdint>

#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

// Grid (step sequences, kv_heads); one thread per rotate-half pair.
__global__ void compressed_append_kernel(CompressedLayer layer, StepRowsView step, const float* keys_pre_rope,
                                         const float* values, const float* inv_freq, float attention_factor,
                                         bool key_norm_scores) {
  const int j = blockIdx.x, h = blockIdx.y, hd = layer.head_dim, half = hd / 2;
  const int64_t head = head_slot(layer, step, j, h);
  const int32_t first = layer.dense_begin[head] + layer.dense_count[head];
  const int row_begin = step.row_begin[j], rows = step.row_begin[j + 1] - row_begin;
  __shared__ float norm_squares[kBlock / 32];
  for (int t = 0; t < rows; ++t) {
    const int row = row_begin + t;
    const int64_t slot = first + t, source = (int64_t(row) * layer.kv_heads + h) * hd;
    const int32_t position = step.row_position[row];
    float squares = 0.0f;
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
      const float a = keys_pre_rope[source + p], b = keys_pre_rope[source + p + half];
      squares += a * a + b * b;
      float c, s;
      rope_factors(position, inv_freq[p], attention_factor, c, s);
      layer.dense_keys[slot * hd + p] = bf16_bits(a * c - b * s);
      layer.dense_keys[slot * hd + p + half] = bf16_bits(b * c + a * s);
      layer.dense_values[slot * hd + p] = bf16_bits(values[source + p]);
      layer.dense_values[slot * hd + p + half] = bf16_bits(values[source + p + half]);
    }
    if (layer.dense_scores != nullptr) {
      squares = warp_sum(squares);
      if (threadIdx.x % 32 == 0) norm_squares[threadIdx.x / 32] = squares;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < (blockDim.x + 31) / 32; ++w) total += norm_squares[w];
        layer.dense_scores[slot] = key_norm_scores ? sqrtf(total) : 0.0f;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      layer.dense_positions[slot] = position;
      if (layer.dense_selected) layer.dense_selected[slot] = 0;
    }
  }
  if (threadIdx.x == 0) layer.dense_count[head] += rows;
}

}  // namespace

cudaError_t compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys_pre_rope,
                              const float* values, const float* inv_freq, float rope_attention_factor,
                              bool key_norm_scores, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  compressed_append_kernel<<<dim3(step.sequences, layer.kv_heads), 64, 0, stream>>>(
      layer, step, keys_pre_rope, values, inv_freq, rope_attention_factor, key_norm_scores);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
