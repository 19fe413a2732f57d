#include "kernels/cuda/calibration_statistics.h"

#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kCoverageThreads = 256;

__device__ float block_reduce(float value, bool take_max, float* scratch) {
  value = take_max ? warp_max(value) : warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the last reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float result = scratch[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) result = take_max ? fmaxf(result, scratch[w]) : result + scratch[w];
  return result;
}

// One block per (query, head): the logits of positions 0..t, a warp per key; their probabilities sorted
// descending by a bitonic sort in shared memory (padded with zeros to a power of two); then the count of the
// largest whose running sum reaches mass * total.
__global__ void __launch_bounds__(kCoverageThreads)
    attention_coverage_kernel(const float* q, const float* k, int heads, int kv_heads, int head_dim, int first_query,
                              float mass, int padded, float* out) {
  extern __shared__ float probabilities[];  // [padded]
  __shared__ float scratch[kCoverageThreads / 32];
  const int i = blockIdx.x, h = blockIdx.y, t = first_query + i, group = heads / kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kCoverageThreads / 32;
  const float scale = rsqrtf(float(head_dim));
  const float* query = q + (int64_t(t) * heads + h) * head_dim;
  for (int j = warp; j <= t; j += warps) {
    const float* key = k + (int64_t(j) * kv_heads + h / group) * head_dim;
    float dot = 0.0f;
    for (int d = lane; d < head_dim; d += 32) dot += query[d] * key[d];
    dot = warp_sum(dot);
    if (lane == 0) probabilities[j] = dot * scale;
  }
  __syncthreads();
  float largest = -INFINITY;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) largest = fmaxf(largest, probabilities[j]);
  largest = block_reduce(largest, true, scratch);
  float total = 0.0f;
  for (int j = threadIdx.x; j < padded; j += blockDim.x) {
    const float p = j <= t ? expf(probabilities[j] - largest) : 0.0f;
    probabilities[j] = p;
    total += p;
  }
  total = block_reduce(total, false, scratch);
  for (int size = 2; size <= padded; size *= 2)
    for (int stride = size / 2; stride > 0; stride /= 2) {
      __syncthreads();
      for (int j = threadIdx.x; j < padded; j += blockDim.x) {
        const int partner = j ^ stride;
        if (partner <= j) continue;
        const bool descending = (j & size) == 0;
        const float a = probabilities[j], b = probabilities[partner];
        if (descending ? a < b : a > b) {
          probabilities[j] = b;
          probabilities[partner] = a;
        }
      }
    }
  __syncthreads();
  if (threadIdx.x == 0) {
    float held = 0.0f;
    int needed = 0;
    while (needed <= t && held < mass * total) held += probabilities[needed++];
    out[int64_t(i) * heads + h] = float(needed) / float(t + 1);
  }
}

__global__ void add_column_sums_kernel(const float* x, int rows, int cols, double* sums) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double sum = sums[c];
  for (int r = 0; r < rows; ++r) sum += x[int64_t(r) * cols + c];
  sums[c] = sum;
}

__global__ void gather_rows_kernel(const float* x, const int32_t* indices, int dim, float* out) {
  const float* row = x + int64_t(indices[blockIdx.x]) * dim;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) out[int64_t(blockIdx.x) * dim + d] = row[d];
}

}  // namespace

cudaError_t attention_coverage(const float* q, const float* k, int rows, int heads, int kv_heads, int head_dim,
                               int first_query, float mass, float* out, cudaStream_t stream) {
  if (rows > kMaxCoverageRows || first_query < 0) return cudaErrorInvalidValue;
  if (first_query >= rows) return cudaSuccess;
  int padded = 1;
  while (padded < rows) padded *= 2;
  const size_t shared_bytes = size_t(padded) * sizeof(float);
  if (const cudaError_t error = cudaFuncSetAttribute(attention_coverage_kernel,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
      error != cudaSuccess)
    return error;
  attention_coverage_kernel<<<dim3(rows - first_query, heads), kCoverageThreads, shared_bytes, stream>>>(
      q, k, heads, kv_heads, head_dim, first_query, mass, padded, out);
  return cudaGetLastError();
}

cudaError_t add_column_sums(const float* x, int rows, int cols, double* sums, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  add_column_sums_kernel<<<(cols + 255) / 256, 256, 0, stream>>>(x, rows, cols, sums);
  return cudaGetLastError();
}

cudaError_t gather_rows(const float* x, const int32_t* indices, int count, int dim, float* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  gather_rows_kernel<<<count, 128, 0, stream>>>(x, indices, dim, out);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
