#include <algorithm>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

__global__ void embed_tokens_kernel(const __nv_bfloat16* table, const int32_t* tokens, int dim, float* out) {
  const int row = blockIdx.x;
  const __nv_bfloat16* source = table + int64_t(tokens[row]) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[int64_t(row) * dim + i] = __bfloat162float(source[i]);
}

__device__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  value = warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  return warp_sum(lane < warps ? warp_sums[lane] : 0.0f);
}

__global__ void rms_norm_kernel(const float* x, const __nv_bfloat16* weight, int dim, float eps, __nv_bfloat16* out) {
  const float* row = x + int64_t(blockIdx.x) * dim;
  float sum_squares = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum_squares += row[i] * row[i];
  const float inv_rms = rsqrtf(block_sum(sum_squares) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    out[int64_t(blockIdx.x) * dim + i] = __float2bfloat16(row[i] * inv_rms * __bfloat162float(weight[i]));
}

__global__ void rope_kernel(float* x, const int32_t* positions, const float* inv_freq, int rows, int heads,
                            int head_dim, float attention_factor) {
  const int half = head_dim / 2;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= int64_t(rows) * heads * half) return;
  const int pair = index % half;
  const int64_t row_head = index / half;
  const int row = row_head / heads;
  // Double keeps the angle exact at long positions; fp32 loses ~1e-3 rad by position 32K.
  double sin_angle, cos_angle;
  sincos(double(positions[row]) * inv_freq[pair], &sin_angle, &cos_angle);
  const float c = float(cos_angle) * attention_factor, s = float(sin_angle) * attention_factor;
  float* v = x + row_head * head_dim;
  const float a = v[pair], b = v[pair + half];
  v[pair] = a * c - b * s;
  v[pair + half] = b * c + a * s;
}

__global__ void swiglu_kernel(const float* gate_up, int64_t n, int ffn, __nv_bfloat16* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t row = i / ffn, column = i % ffn;
  const float gate = gate_up[row * 2 * ffn + column], up = gate_up[row * 2 * ffn + ffn + column];
  out[i] = __float2bfloat16(gate / (1.0f + __expf(-gate)) * up);
}

__global__ void add_row_bias_kernel(float* x, const float* bias, int64_t n, int dim) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += bias[i % dim];
}

__global__ void append_kv_kernel(const float* k, const float* v, const int32_t* row_sequence,
                                 const int32_t* row_position, int kv_heads, int head_dim, int capacity,
                                 __nv_bfloat16* k_cache, __nv_bfloat16* v_cache) {
  const int row = blockIdx.x, head = blockIdx.y;
  const int64_t source = (int64_t(row) * kv_heads + head) * head_dim;
  const int64_t target = ((int64_t(row_sequence[row]) * kv_heads + head) * capacity + row_position[row]) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    k_cache[target + d] = __float2bfloat16(k[source + d]);
    v_cache[target + d] = __float2bfloat16(v[source + d]);
  }
}

__global__ void fill_noise_bf16_kernel(__nv_bfloat16* out, int64_t n, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(2.0f * NoiseValue(NoiseBits(seed, i)));
}

int blocks_for(int64_t n, int threads) { return int((n + threads - 1) / threads); }

}  // namespace

cudaError_t embed_tokens(const __nv_bfloat16* table, const int32_t* tokens, int rows, int dim, float* out,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  embed_tokens_kernel<<<rows, 256, 0, stream>>>(table, tokens, dim, out);
  return cudaGetLastError();
}

cudaError_t rms_norm(const float* x, const __nv_bfloat16* weight, int rows, int dim, float eps, __nv_bfloat16* out,
                     cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_kernel<<<rows, dim >= 1024 ? 1024 : 256, 0, stream>>>(x, weight, dim, eps, out);
  return cudaGetLastError();
}

cudaError_t apply_rope(float* x, const int32_t* positions, const float* inv_freq, int rows, int heads, int head_dim,
                       float attention_factor, cudaStream_t stream) {
  const int64_t pairs = int64_t(rows) * heads * (head_dim / 2);
  if (pairs == 0) return cudaSuccess;
  rope_kernel<<<blocks_for(pairs, 256), 256, 0, stream>>>(x, positions, inv_freq, rows, heads, head_dim,
                                                          attention_factor);
  return cudaGetLastError();
}

cudaError_t fill_noise_bf16(__nv_bfloat16* out, int64_t n, uint32_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fill_noise_bf16_kernel<<<std::min<int64_t>(blocks_for(n, 256), 132 * 16), 256, 0, stream>>>(out, n, seed);
  return cudaGetLastError();
}

cudaError_t swiglu(const float* gate_up, int64_t rows, int ffn, __nv_bfloat16* out, cudaStream_t stream) {
  const int64_t n = rows * ffn;
  if (n == 0) return cudaSuccess;
  swiglu_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(gate_up, n, ffn, out);
  return cudaGetLastError();
}

cudaError_t add_row_bias(float* x, const float* bias, int rows, int dim, cudaStream_t stream) {
  const int64_t n = int64_t(rows) * dim;
  if (n == 0) return cudaSuccess;
  add_row_bias_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(x, bias, n, dim);
  return cudaGetLastError();
}

cudaError_t append_kv(const float* k, const float* v, const int32_t* row_sequence, const int32_t* row_position,
                      int rows, int kv_heads, int head_dim, int capacity, __nv_bfloat16* k_cache,
                      __nv_bfloat16* v_cache, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  append_kv_kernel<<<dim3(rows, kv_heads), 128, 0, stream>>>(k, v, row_sequence, row_position, kv_heads, head_dim,
                                                             capacity, k_cache, v_cache);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
