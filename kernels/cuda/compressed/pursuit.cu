// matching_pursuit (the oracle: cpu/compressed/pursuit.cc): the leaving vectors coded against a dictionary by a
// cluster kernel, and its launcher.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include <cooperative_groups.h>

#include "kernels/cuda/compressed/attention_schedule.h"
#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

// A cluster of blocks codes kVectors vectors at once: each block holds a slice of the dictionary's atoms (in
// shared memory when it fits) and finds its slice's best atom per vector, a warp per atom at a time with the
// lanes reading the atom's row coalesced and reducing with shuffles; the cluster then agrees on the best atom
// through distributed shared memory (lowest index on ties, as the CPU oracle's strict comparison), and every
// block subtracts it from its copy of the residuals. Spreading a vector's atoms over a cluster keeps a decode
// step's few vectors on many SMs; coding several vectors per cluster reuses each slice for a prefill's many.
// Grid (clusters * cluster blocks, jobs), cluster (cluster blocks): one launch codes keys and values side by side.
constexpr int kPursuitWarps = 8;
constexpr int kMaxPursuitClusterBlocks = 16;
constexpr int kPursuitAtomsPerBlock = 64;  // fewest atoms worth a block of the cluster

// Whether (value, index) beats (best_value, best_index): larger |value|, then the lower index.
__device__ inline bool better_pursuit_choice(float value, int index, float best_value, int best_index) {
  return fabsf(value) > fabsf(best_value) || (fabsf(value) == fabsf(best_value) && index < best_index);
}

struct PursuitLaunch {
  PursuitJob jobs[kMaxCodingJobs];
  int atoms, dim;
  CodingRows rows;
  bool slice_in_shared;
};

template <int kVectors>
__global__ void __launch_bounds__(kPursuitWarps * 32) matching_pursuit_kernel(PursuitLaunch p) {
  const PursuitJob job = p.jobs[blockIdx.y];
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), blocks = int(cluster.num_blocks());
  const int64_t first_vector = int64_t(blockIdx.x / blocks) * kVectors;
  bool any_coded = false;
  for (int v = 0; v < kVectors; ++v) any_coded |= p.rows.coded(first_vector + v);
  if (!any_coded) return;  // the same for every block of the cluster

  extern __shared__ float shared[];
  float* residual = shared;  // [kVectors, dim]
  __shared__ float warp_value[kPursuitWarps][kVectors];
  __shared__ int warp_index[kPursuitWarps][kVectors];
  // Read by the other blocks of the cluster; two, so a block ahead by a step never overwrites what a block
  // behind is still reading.
  __shared__ float block_value[2][kVectors];
  __shared__ int block_index[2][kVectors];
  __shared__ float chosen_value[kVectors];
  __shared__ int chosen_index[kVectors];
  const int dim = p.dim, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_block = (p.atoms + blocks - 1) / blocks;
  const int first_atom = min(p.atoms, rank * per_block),
            slice_atoms = min(p.atoms, first_atom + per_block) - first_atom;
  const float* slice = job.dictionary + int64_t(first_atom) * dim;
  float* shared_slice = shared + kVectors * dim;  // [per_block, dim] when the slice is in shared memory
  if (p.slice_in_shared) {
    for (int i = threadIdx.x; i < slice_atoms * dim; i += blockDim.x) shared_slice[i] = slice[i];
    slice = shared_slice;
  }
  for (int i = threadIdx.x; i < kVectors * dim; i += blockDim.x) {
    const int64_t vector = first_vector + i / dim;
    residual[i] = p.rows.coded(vector) ? job.x[vector * dim + i % dim] : 0.0f;
  }
  __syncthreads();

  for (int s = 0; s < job.sparsity; ++s) {
    float best_value[kVectors];
    int best_index[kVectors];
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      best_value[v] = 0.0f;
      best_index[v] = 0x7fffffff;
    }
    // One vector alone leaves a warp's dot products a single dependent chain: take several atoms at a time.
    constexpr int kInFlight = kVectors == 1 ? 4 : 1;
    for (int first = warp * kInFlight; first < slice_atoms; first += kPursuitWarps * kInFlight) {
      float correlation[kInFlight][kVectors] = {};
      for (int d = lane; d < dim; d += 32)
#pragma unroll
        for (int k = 0; k < kInFlight; ++k) {
          if (first + k >= slice_atoms) break;
          const float element = slice[int64_t(first + k) * dim + d];
#pragma unroll
          for (int v = 0; v < kVectors; ++v) correlation[k][v] += residual[v * dim + d] * element;
        }
#pragma unroll
      for (int k = 0; k < kInFlight; ++k)
#pragma unroll
        for (int v = 0; v < kVectors; ++v) {
          const float value = warp_sum(correlation[k][v]);
          if (first + k < slice_atoms && (fabsf(value) > fabsf(best_value[v]) || best_index[v] == 0x7fffffff)) {
            best_value[v] = value;
            best_index[v] = first_atom + first + k;
          }
        }
    }
    if (lane == 0)
#pragma unroll
      for (int v = 0; v < kVectors; ++v) {
        warp_value[warp][v] = best_value[v];
        warp_index[warp][v] = best_index[v];
      }
    __syncthreads();
    const int buffer = s % 2;
    if (threadIdx.x < kVectors) {
      const int v = threadIdx.x;
      float value = warp_value[0][v];
      int index = warp_index[0][v];
      for (int w = 1; w < kPursuitWarps; ++w)
        if (better_pursuit_choice(warp_value[w][v], warp_index[w][v], value, index)) {
          value = warp_value[w][v];
          index = warp_index[w][v];
        }
      block_value[buffer][v] = value;
      block_index[buffer][v] = index;
    }
    cluster.sync();
    // Sixteen lanes per vector each read one block's choice and reduce them with shuffles.
    if (threadIdx.x < kVectors * kMaxPursuitClusterBlocks) {
      constexpr int kLanes = kVectors * kMaxPursuitClusterBlocks;
      constexpr unsigned kMask = kLanes >= 32 ? 0xffffffffu : (1u << kLanes) - 1;
      const int v = threadIdx.x / kMaxPursuitClusterBlocks, r = threadIdx.x % kMaxPursuitClusterBlocks;
      float value = 0.0f;
      int index = 0x7fffffff;
      if (r < blocks) {
        value = *cluster.map_shared_rank(&block_value[buffer][v], r);
        index = *cluster.map_shared_rank(&block_index[buffer][v], r);
      }
#pragma unroll
      for (int offset = kMaxPursuitClusterBlocks / 2; offset > 0; offset /= 2) {
        const float other_value = __shfl_xor_sync(kMask, value, offset);
        const int other_index = __shfl_xor_sync(kMask, index, offset);
        if (better_pursuit_choice(other_value, other_index, value, index)) {
          value = other_value;
          index = other_index;
        }
      }
      if (r == 0) {
        const uint16_t rounded = saturated_fp16_bits(value);
        const int64_t vector = first_vector + v;
        if (rank == 0 && p.rows.coded(vector))
          job.codes[vector * job.sparsity + s] = PackCode(uint16_t(index), rounded);
        chosen_value[v] = __half2float(__ushort_as_half(rounded));
        chosen_index[v] = index;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kVectors * dim; i += blockDim.x) {
      const int v = i / dim, owner = chosen_index[v] / per_block;
      // One vector's atom from the shared memory of the block holding it, nearer than L2; eight vectors' atoms
      // come faster from L2 than from as many other blocks.
      const float* atom = kVectors == 1 && p.slice_in_shared ? cluster.map_shared_rank(shared_slice, owner) +
                                                                   int64_t(chosen_index[v] - owner * per_block) * dim
                                                             : job.dictionary + int64_t(chosen_index[v]) * dim;
      residual[i] -= chosen_value[v] * atom[i % dim];
    }
    __syncthreads();
  }
  cluster.sync();  // no block leaves while another may still read its choices
}

// Dynamic shared memory a block of matching_pursuit_kernel<kVectors> may take, after raising the kernel's limits
// (16-block clusters, the device's opt-in shared memory) the first time.
template <int kVectors>
int pursuit_shared_limit() {
  static const int limit = [] {
    const auto kernel = matching_pursuit_kernel<kVectors>;
    int device = 0, optin = 0;
    cudaFuncAttributes attributes = {};
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
        cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess ||
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      return 48 << 10;
    const int dynamic = optin - int(attributes.sharedSizeBytes);
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic) == cudaSuccess ? dynamic
                                                                                                             : 48 << 10;
  }();
  return limit;
}

// Whether a cluster of the launch's shape (its cluster blocks and dynamic shared memory) fits on the device at all.
// cudaOccupancyMaxActiveClusters is a driver call that every coded layer of every step would repeat, so each shape's
// answer is kept for the process, as pursuit_shared_limit keeps the kernel's limits; a failed query is not kept.
template <int kVectors>
bool pursuit_cluster_fits(const cudaLaunchConfig_t& config, unsigned cluster_blocks) {
  static std::mutex mutex;
  static std::map<std::pair<unsigned, size_t>, bool> fits;
  const std::pair<unsigned, size_t> shape{cluster_blocks, config.dynamicSmemBytes};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto known = fits.find(shape); known != fits.end()) return known->second;
  }
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, matching_pursuit_kernel<kVectors>, &config) != cudaSuccess) return false;
  const std::lock_guard<std::mutex> lock(mutex);
  fits[shape] = active > 0;
  return active > 0;
}

// Launches the pursuit with the largest cluster (up to `blocks`) the device can hold, each block's slice of
// atoms in shared memory where it fits.
template <int kVectors>
cudaError_t launch_pursuit(PursuitLaunch launch, int jobs, int blocks, cudaStream_t stream) {
  const int limit = pursuit_shared_limit<kVectors>();
  const int64_t clusters = (launch.rows.vectors() + kVectors - 1) / kVectors;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kPursuitWarps * 32);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  const size_t residual_bytes = size_t(kVectors) * launch.dim * sizeof(float);
  for (const int cluster_blocks : {blocks, std::min(blocks, 8), std::min(blocks, 4)})
    for (const bool slice_in_shared : {true, false}) {
      const int per_block = (launch.atoms + cluster_blocks - 1) / cluster_blocks;
      const size_t bytes = residual_bytes + (slice_in_shared ? size_t(per_block) * launch.dim * sizeof(float) : 0);
      if (bytes > size_t(limit)) continue;
      attribute.val.clusterDim.x = cluster_blocks;
      attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
      config.gridDim = dim3(unsigned(clusters * cluster_blocks), jobs);
      config.dynamicSmemBytes = bytes;
      if (!pursuit_cluster_fits<kVectors>(config, unsigned(cluster_blocks))) continue;
      launch.slice_in_shared = slice_in_shared;
      return cudaLaunchKernelEx(&config, matching_pursuit_kernel<kVectors>, launch);
    }
  return cudaErrorInvalidConfiguration;
}

}  // namespace

cudaError_t matching_pursuit(const PursuitJob* jobs, int job_count, int atoms, int dim, int groups, int group_size,
                             const int32_t* counts, cudaStream_t stream) {
  const int64_t vectors = int64_t(groups) * group_size;
  if (vectors == 0 || job_count == 0) return cudaSuccess;
  if (job_count > kMaxCodingJobs) return cudaErrorInvalidValue;
  PursuitLaunch launch = {{}, atoms, dim, {groups, group_size, counts}, false};
  std::copy_n(jobs, job_count, launch.jobs);
  const int blocks = std::clamp(atoms / kPursuitAtomsPerBlock, 1, kMaxPursuitClusterBlocks);
  // One vector per cluster while that leaves SMs idle (decode steps); eight, sharing each slice, after that.
  if (vectors * job_count * blocks <= 2 * multiprocessors())
    return launch_pursuit<1>(launch, job_count, blocks, stream);
  return launch_pursuit<8>(launch, job_count, blocks, stream);
}

}  // namespace kvplan::cuda
