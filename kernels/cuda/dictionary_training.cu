// Dictionary training kernels (kernels/cuda/dictionary_training.h). Each performs its oracle's floating-point
// operations in the oracle's order, with explicit _rn intrinsics where nvcc would otherwise contract a multiply
// and an add into one rounding (the CPU build has no FMA), so GPU and CPU agree to the bit on the same inputs.
// Sums over a cluster's or an atom's entries run in one thread, in entry order, which group_by_key's stable sort
// makes deterministic: no atomics, so training gives the same dictionary on every run.
#include <algorithm>
#include <climits>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/dictionary_training.h"

namespace kvplan::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // row kernels: one warp per row
constexpr int kThreads = 128;     // per-cluster and per-atom kernels: threads across dim
constexpr size_t kAlignment = 256;

size_t aligned(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

size_t sort_bytes(int entries) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint16_t*>(nullptr),
                                  static_cast<uint16_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), entries);
  return bytes;
}

unsigned row_blocks(int64_t n) { return unsigned((n + kRowsPerBlock - 1) / kRowsPerBlock); }

// The (value, index) pair of the warp that `better` ranks first, ties going to the lower index; every lane gets it.
template <typename Better>
__device__ void warp_best(float& value, int& index, Better better) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffff, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffff, index, offset);
    if (better(other_value, value) || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// fp16 as the CPU rounds coefficients (base/number_formats.h): to nearest even, saturating at the largest finite.
__device__ float round_to_fp16(float value) {
  return __half2float(__float2half_rn(fminf(fmaxf(value, -65504.0f), 65504.0f)));
}

__global__ void identity_kernel(int entries, int32_t* out) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < entries; e += gridDim.x * blockDim.x) out[e] = e;
}

// segment_begin[k] = the first position of sorted_keys holding a key >= k.
__global__ void segment_begin_kernel(const uint16_t* sorted_keys, int entries, int key_count, int32_t* segment_begin) {
  const int key = blockIdx.x * blockDim.x + threadIdx.x;
  if (key > key_count) return;
  int low = 0, high = entries;
  while (low < high) {
    const int middle = (low + high) / 2;
    if (sorted_keys[middle] < key) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  segment_begin[key] = low;
}

__global__ void squared_norms_kernel(const float* rows, int64_t n, int dim, float* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float* row = rows + i * dim;
  double sum = 0;
  for (int d = 0; d < dim; ++d) sum = __dadd_rn(sum, __dmul_rn(double(row[d]), double(row[d])));
  out[i] = float(sum);
}

__global__ void nearest_centroids_kernel(const float* products, const float* centroid_squared_norms, int64_t n,
                                         int clusters, uint16_t* assignment) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const float* row = products + i * clusters;
  float best = 0.0f;
  int best_index = INT_MAX;  // no cluster seen yet
  for (int c = lane; c < clusters; c += 32) {
    const float distance = __fsub_rn(centroid_squared_norms[c], 2.0f * row[c]);
    if (best_index == INT_MAX || distance < best) {
      best = distance;
      best_index = c;
    }
  }
  if (best_index == INT_MAX) best = INFINITY;
  warp_best(best, best_index, [](float a, float b) { return a < b; });
  if (lane == 0) assignment[i] = uint16_t(best_index);
}

// Grid: one block per cluster.
__global__ void update_centroids_kernel(const float* x, int dim, const int32_t* order, const int32_t* segment_begin,
                                        float* centroids) {
  const int begin = segment_begin[blockIdx.x], end = segment_begin[blockIdx.x + 1];
  if (begin == end) return;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    double sum = 0;
    for (int j = begin; j < end; ++j) sum = __dadd_rn(sum, double(x[int64_t(order[j]) * dim + d]));
    centroids[int64_t(blockIdx.x) * dim + d] = float(sum / (end - begin));
  }
}

__global__ void pursuit_step_kernel(const float* correlations, const float* dictionary, int64_t n, int atoms, int dim,
                                    int step, int sparsity, float* residual, uint16_t* indices, float* coefficients) {
  const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  const float* row = correlations + i * atoms;
  float best = -1.0f;  // below every |correlation|, so a lane's first atom always wins over it
  int best_index = INT_MAX;
  for (int a = lane; a < atoms; a += 32) {
    const float magnitude = fabsf(row[a]);
    if (magnitude > best) {
      best = magnitude;
      best_index = a;
    }
  }
  warp_best(best, best_index, [](float a, float b) { return a > b; });
  const float coefficient = round_to_fp16(row[best_index]);
  if (lane == 0) {
    indices[i * sparsity + step] = uint16_t(best_index);
    coefficients[i * sparsity + step] = coefficient;
  }
  const float* atom = dictionary + int64_t(best_index) * dim;
  float* target = residual + i * dim;
  for (int d = lane; d < dim; d += 32) target[d] = __fsub_rn(target[d], __fmul_rn(coefficient, atom[d]));
}

// Grid: one block per atom.
__global__ void update_atoms_kernel(const float* residual, const float* coefficients, int sparsity,
                                    const int32_t* order, const int32_t* segment_begin, int dim, float* dictionary) {
  const int begin = segment_begin[blockIdx.x], end = segment_begin[blockIdx.x + 1];
  double weight = 0;
  for (int j = begin; j < end; ++j) {
    const double c = coefficients[order[j]];
    weight = __dadd_rn(weight, __dmul_rn(c, c));
  }
  if (!(weight > 0)) return;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    double step = 0;
    for (int j = begin; j < end; ++j) {
      const int entry = order[j];
      step = __dadd_rn(step, double(__fmul_rn(coefficients[entry], residual[int64_t(entry / sparsity) * dim + d])));
    }
    float& value = dictionary[int64_t(blockIdx.x) * dim + d];
    value = __fadd_rn(value, float(step / weight));
  }
}

// Grid: one block per atom.
__global__ void normalise_atoms_kernel(float* dictionary, int dim) {
  __shared__ float inverse;
  float* atom = dictionary + int64_t(blockIdx.x) * dim;
  if (threadIdx.x == 0) {
    double norm = 0;
    for (int d = 0; d < dim; ++d) norm = __dadd_rn(norm, __dmul_rn(double(atom[d]), double(atom[d])));
    inverse = norm > 1e-20 ? float(1.0 / sqrt(norm)) : 0.0f;
  }
  __syncthreads();
  const int basis = int(blockIdx.x % dim);
  for (int d = threadIdx.x; d < dim; d += blockDim.x)
    atom[d] = inverse == 0.0f && d == basis ? 1.0f : __fmul_rn(atom[d], inverse);
}

}  // namespace

size_t group_by_key_workspace_bytes(int entries) {
  return aligned(size_t(entries) * sizeof(uint16_t)) + aligned(size_t(entries) * sizeof(int32_t)) + sort_bytes(entries);
}

cudaError_t group_by_key(const uint16_t* keys, int entries, int key_count, void* workspace, size_t workspace_bytes,
                         int32_t* order, int32_t* segment_begin, cudaStream_t stream) {
  if (workspace_bytes < group_by_key_workspace_bytes(entries)) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  uint16_t* sorted_keys = reinterpret_cast<uint16_t*>(base);
  base += aligned(size_t(entries) * sizeof(uint16_t));
  int32_t* identity = reinterpret_cast<int32_t*>(base);
  base += aligned(size_t(entries) * sizeof(int32_t));
  if (entries > 0) {
    identity_kernel<<<std::min((entries + 255) / 256, 1024), 256, 0, stream>>>(entries, identity);
    size_t bytes = sort_bytes(entries);
    const cudaError_t error =
        cub::DeviceRadixSort::SortPairs(base, bytes, keys, sorted_keys, identity, order, entries, 0, 16, stream);
    if (error != cudaSuccess) return error;
  }
  segment_begin_kernel<<<(key_count + 256) / 256, 256, 0, stream>>>(sorted_keys, entries, key_count, segment_begin);
  return cudaGetLastError();
}

cudaError_t squared_norms(const float* rows, int64_t n, int dim, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  squared_norms_kernel<<<unsigned((n + 127) / 128), 128, 0, stream>>>(rows, n, dim, out);
  return cudaGetLastError();
}

cudaError_t nearest_centroids(const float* products, const float* centroid_squared_norms, int64_t n, int clusters,
                              uint16_t* assignment, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  nearest_centroids_kernel<<<row_blocks(n), kRowsPerBlock * 32, 0, stream>>>(products, centroid_squared_norms, n,
                                                                             clusters, assignment);
  return cudaGetLastError();
}

cudaError_t update_centroids(const float* x, int dim, const int32_t* order, const int32_t* segment_begin, int clusters,
                             float* centroids, cudaStream_t stream) {
  if (clusters == 0) return cudaSuccess;
  update_centroids_kernel<<<clusters, kThreads, 0, stream>>>(x, dim, order, segment_begin, centroids);
  return cudaGetLastError();
}

cudaError_t pursuit_step(const float* correlations, const float* dictionary, int64_t n, int atoms, int dim, int step,
                         int sparsity, float* residual, uint16_t* indices, float* coefficients, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  pursuit_step_kernel<<<row_blocks(n), kRowsPerBlock * 32, 0, stream>>>(correlations, dictionary, n, atoms, dim, step,
                                                                        sparsity, residual, indices, coefficients);
  return cudaGetLastError();
}

cudaError_t update_atoms(const float* residual, const float* coefficients, int sparsity, const int32_t* order,
                         const int32_t* segment_begin, int atoms, int dim, float* dictionary, cudaStream_t stream) {
  if (atoms == 0) return cudaSuccess;
  update_atoms_kernel<<<atoms, kThreads, 0, stream>>>(residual, coefficients, sparsity, order, segment_begin, dim,
                                                      dictionary);
  return cudaGetLastError();
}

cudaError_t normalise_atoms(float* dictionary, int atoms, int dim, cudaStream_t stream) {
  if (atoms == 0) return cudaSuccess;
  normalise_atoms_kernel<<<atoms, kThreads, 0, stream>>>(dictionary, dim);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
