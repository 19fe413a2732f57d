#include <algorithm>
#include <cfloat>
#include <vector>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;

// Lane l of a warp owns kPairs rotate-half pairs: dims (l + 32 i) and (l + 32 i + head_dim / 2), so RoPE is
// lane-local and dictionary rows are read coalesced.
template <int kPairs>
struct LaneVector {
  float low[kPairs], high[kPairs];
};

template <int kPairs>
__device__ void decode_atoms(const float* dictionary, const uint16_t* atoms, const __half* coefficients, int sparsity,
                             int lane, LaneVector<kPairs>& out) {
  constexpr int kHalf = kPairs * 32;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) out.low[i] = out.high[i] = 0.0f;
  for (int s = 0; s < sparsity; ++s) {
    const float* atom = dictionary + int64_t(atoms[s]) * 2 * kHalf;
    const float c = __half2float(coefficients[s]);
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      out.low[i] += c * atom[lane + 32 * i];
      out.high[i] += c * atom[kHalf + lane + 32 * i];
    }
  }
}

__device__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Where a launch's blocks write: the final output (one split) or partial states (several splits).
struct SparseOutputs {
  float* out;
  float* probabilities;    // one split only
  float* logit_workspace;  // [rows, heads, total_entries] when probabilities are wanted
  PartialView partial;     // several splits
  int splits, chunk, total_entries;
};

// Grid (splits, kv_heads, rows); kWarps warps walk the split's entries of the head, each with its own online
// softmax per group head.
template <int kPairs, int kGroup>
__global__ void __launch_bounds__(kWarps * 32)
    sparse_attention_kernel(SparseAttentionShape shape, const float* q, const int32_t* query_positions,
                            CompressedCacheView cache, const float* key_dictionary, const float* value_dictionary,
                            const float* inv_freq, SparseOutputs outputs) {
  constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
  const int split = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
  float* const out = outputs.out;
  float* const probabilities = outputs.probabilities;
  float* const logit_workspace = outputs.logit_workspace;
  const int total_entries = outputs.total_entries;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = shape.heads / shape.kv_heads;
  const int query_position = query_positions[row];

  LaneVector<kPairs> query[kGroup], acc[kGroup];
  float running_max[kGroup], running_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    running_max[g] = -FLT_MAX;
    running_sum[g] = 0.0f;
    const float* source = q + (int64_t(row) * shape.heads + kv_head * group + (g < group ? g : 0)) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      query[g].low[i] = g < group ? source[lane + 32 * i] * shape.scale : 0.0f;
      query[g].high[i] = g < group ? source[kHalf + lane + 32 * i] * shape.scale : 0.0f;
      acc[g].low[i] = acc[g].high[i] = 0.0f;
    }
  }
  const int coded_begin = cache.coded_offsets[kv_head], coded_end = cache.coded_offsets[kv_head + 1];
  const int dense_begin = cache.dense_offsets[kv_head], dense_end = cache.dense_offsets[kv_head + 1];
  const int coded = coded_end - coded_begin, entries = coded + dense_end - dense_begin;
  // Entries of this head start here in the probabilities / workspace layout.
  const int head_entry_offset = coded_begin + dense_begin;

  const int split_end = min(entries, (split + 1) * outputs.chunk);
  for (int e = split * outputs.chunk + warp; e < split_end; e += kWarps) {
    LaneVector<kPairs> key, value;
    int position;
    float bias = 0.0f;
    if (e < coded) {
      const int entry = coded_begin + e;
      position = cache.coded_positions[entry];
      if (position > query_position) continue;
      decode_atoms<kPairs>(key_dictionary, cache.key_atoms + int64_t(entry) * shape.key_sparsity,
                           cache.key_coefficients + int64_t(entry) * shape.key_sparsity, shape.key_sparsity, lane, key);
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        // The angle is formed and reduced to [0, 2 pi) in double (fp32 would be ~1e-3 rad off at position 32K);
        // the sine and cosine of the reduced angle are then cheap and exact enough in fp32.
        constexpr double kTwoPi = 6.283185307179586;
        double angle = double(position) * inv_freq[lane + 32 * i];
        angle -= kTwoPi * floor(angle / kTwoPi);
        float s, c;
        sincosf(float(angle), &s, &c);
        c *= shape.rope_attention_factor;
        s *= shape.rope_attention_factor;
        const float a = key.low[i], b = key.high[i];
        key.low[i] = a * c - b * s;
        key.high[i] = b * c + a * s;
      }
      decode_atoms<kPairs>(value_dictionary, cache.value_atoms + int64_t(entry) * shape.value_sparsity,
                           cache.value_coefficients + int64_t(entry) * shape.value_sparsity, shape.value_sparsity, lane,
                           value);
    } else {
      const int entry = dense_begin + e - coded;
      position = cache.dense_positions[entry];
      if (position > query_position) continue;
      if (cache.dense_bias != nullptr) bias = cache.dense_bias[entry];
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        key.low[i] = cache.dense_keys[int64_t(entry) * kHeadDim + lane + 32 * i];
        key.high[i] = cache.dense_keys[int64_t(entry) * kHeadDim + kHalf + lane + 32 * i];
        value.low[i] = cache.dense_values[int64_t(entry) * kHeadDim + lane + 32 * i];
        value.high[i] = cache.dense_values[int64_t(entry) * kHeadDim + kHalf + lane + 32 * i];
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g >= group) break;
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) dot += query[g].low[i] * key.low[i] + query[g].high[i] * key.high[i];
      const float logit = warp_sum(dot) + bias;
      if (logit_workspace != nullptr && lane == 0)
        logit_workspace[(int64_t(row) * shape.heads + kv_head * group + g) * total_entries + head_entry_offset + e] =
            logit;
      const float new_max = fmaxf(running_max[g], logit);
      const float correction = __expf(running_max[g] - new_max), weight = __expf(logit - new_max);
      running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        acc[g].low[i] = acc[g].low[i] * correction + weight * value.low[i];
        acc[g].high[i] = acc[g].high[i] * correction + weight * value.high[i];
      }
      running_max[g] = new_max;
    }
  }

  __shared__ WarpSoftmaxStates<kWarps, kGroup, kHeadDim> states;
  states.publish(warp, lane, running_max, running_sum);
#pragma unroll
  for (int g = 0; g < kGroup; ++g)
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      states.acc[warp][g][lane + 32 * i] = acc[g].low[i];
      states.acc[warp][g][kHalf + lane + 32 * i] = acc[g].high[i];
    }
  __syncthreads();
  if (outputs.splits > 1) {
    for (int index = threadIdx.x; index < group * kHeadDim; index += blockDim.x) {
      const int g = index / kHeadDim, d = index % kHeadDim;
      const SoftmaxState merged = states.merge(g, d);
      const int64_t slot = (int64_t(row) * shape.heads + kv_head * group + g) * outputs.splits + split;
      outputs.partial.acc[slot * kHeadDim + d] = merged.acc;
      if (d == 0) {
        outputs.partial.max[slot] = merged.max;
        outputs.partial.sum[slot] = merged.sum;
      }
    }
    return;
  }
  __shared__ float final_max[kGroup], final_sum[kGroup];
  for (int index = threadIdx.x; index < group * kHeadDim; index += blockDim.x) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    const SoftmaxState merged = states.merge(g, d);
    out[(int64_t(row) * shape.heads + kv_head * group + g) * kHeadDim + d] =
        merged.sum > 0.0f ? merged.acc / merged.sum : 0.0f;
    if (d == 0) {
      final_max[g] = merged.max;
      final_sum[g] = merged.sum;
    }
  }
  if (probabilities == nullptr) return;
  __syncthreads();
  // This row's probabilities, maxed over the group, folded into the output with an integer atomicMax (valid
  // because probabilities are non-negative floats, whose bit patterns order like the values).
  for (int e = threadIdx.x; e < entries; e += blockDim.x) {
    const int position =
        e < coded ? cache.coded_positions[coded_begin + e] : cache.dense_positions[dense_begin + e - coded];
    if (position > query_position) continue;
    float probability = 0.0f;
    for (int g = 0; g < group; ++g)
      if (final_sum[g] > 0.0f)
        probability = fmaxf(probability,
                            __expf(logit_workspace[(int64_t(row) * shape.heads + kv_head * group + g) * total_entries +
                                                   head_entry_offset + e] -
                                   final_max[g]) /
                                final_sum[g]);
    atomicMax(reinterpret_cast<int*>(probabilities + head_entry_offset + e), __float_as_int(probability));
  }
}

template <int kPairs>
void launch_sparse(dim3 grid, cudaStream_t stream, const SparseAttentionShape& shape, const float* q,
                   const int32_t* query_positions, const CompressedCacheView& cache, const float* key_dictionary,
                   const float* value_dictionary, const float* inv_freq, const SparseOutputs& outputs) {
  const int group = shape.heads / shape.kv_heads;
  const int threads = kWarps * 32;
  if (group <= 1)
    sparse_attention_kernel<kPairs, 1><<<grid, threads, 0, stream>>>(shape, q, query_positions, cache, key_dictionary,
                                                                     value_dictionary, inv_freq, outputs);
  else if (group <= 2)
    sparse_attention_kernel<kPairs, 2><<<grid, threads, 0, stream>>>(shape, q, query_positions, cache, key_dictionary,
                                                                     value_dictionary, inv_freq, outputs);
  else if (group <= 4)
    sparse_attention_kernel<kPairs, 4><<<grid, threads, 0, stream>>>(shape, q, query_positions, cache, key_dictionary,
                                                                     value_dictionary, inv_freq, outputs);
  else
    sparse_attention_kernel<kPairs, kMaxGroup><<<grid, threads, 0, stream>>>(
        shape, q, query_positions, cache, key_dictionary, value_dictionary, inv_freq, outputs);
}

// One block per vector: correlations with every atom, block argmax (lowest index on ties, as the CPU oracle's
// strict comparison), fp16 rounding, residual update.
__global__ void matching_pursuit_kernel(const float* dictionary, int atoms, int dim, const float* x, int sparsity,
                                        uint16_t* indices, __half* coefficients) {
  extern __shared__ float residual[];
  __shared__ float best_value[32];
  __shared__ int best_index[32];
  const int vector = blockIdx.x;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) residual[d] = x[int64_t(vector) * dim + d];
  __syncthreads();
  for (int s = 0; s < sparsity; ++s) {
    float my_value = 0.0f;
    int my_index = 0x7fffffff;
    for (int a = threadIdx.x; a < atoms; a += blockDim.x) {
      const float* atom = dictionary + int64_t(a) * dim;
      float correlation = 0.0f;
      for (int d = 0; d < dim; ++d) correlation += residual[d] * atom[d];
      if (fabsf(correlation) > fabsf(my_value) || my_index == 0x7fffffff) {
        my_value = correlation;
        my_index = a;
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other_value = __shfl_xor_sync(0xffffffff, my_value, offset);
      const int other_index = __shfl_xor_sync(0xffffffff, my_index, offset);
      if (fabsf(other_value) > fabsf(my_value) || (fabsf(other_value) == fabsf(my_value) && other_index < my_index)) {
        my_value = other_value;
        my_index = other_index;
      }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) {
      best_value[warp] = my_value;
      best_index[warp] = my_index;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < warps; ++w)
        if (fabsf(best_value[w]) > fabsf(best_value[0]) ||
            (fabsf(best_value[w]) == fabsf(best_value[0]) && best_index[w] < best_index[0])) {
          best_value[0] = best_value[w];
          best_index[0] = best_index[w];
        }
      const __half rounded = __float2half_rn(best_value[0]);
      indices[int64_t(vector) * sparsity + s] = uint16_t(best_index[0]);
      coefficients[int64_t(vector) * sparsity + s] = rounded;
      best_value[0] = __half2float(rounded);
    }
    __syncthreads();
    const float* atom = dictionary + int64_t(best_index[0]) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) residual[d] -= best_value[0] * atom[d];
    __syncthreads();
  }
}

__global__ void key_l2_norms_kernel(const float* keys, int n, int head_dim, float* norms) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (warp >= n) return;
  float sum = 0.0f;
  for (int d = lane; d < head_dim; d += 32)
    sum += keys[int64_t(warp) * head_dim + d] * keys[int64_t(warp) * head_dim + d];
  sum = warp_sum(sum);
  if (lane == 0) norms[warp] = sqrtf(sum);
}

__global__ void merge_into_slot_kernel(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                                       float* slot_value, const float* slot_tokens) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= head_dim) return;
  float key = slot_key[d], value = slot_value[d], tokens = *slot_tokens;
  for (int i = 0; i < count; ++i) {
    tokens += 1.0f;
    key += __fdiv_rn(keys[int64_t(i) * head_dim + d] - key, tokens);
    value += __fdiv_rn(values[int64_t(i) * head_dim + d] - value, tokens);
  }
  slot_key[d] = key;
  slot_value[d] = value;
}

__global__ void add_tokens_kernel(float* slot_tokens, int count) { *slot_tokens += float(count); }

}  // namespace

bool sparse_attention_supported(int heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128 || head_dim == 256) && kv_heads > 0 && heads % kv_heads == 0 &&
         heads / kv_heads <= kMaxGroup;
}

size_t sparse_attention_workspace_bytes(const SparseAttentionShape& shape, bool probabilities) {
  if (probabilities) return size_t(shape.rows) * shape.heads * shape.total_entries * sizeof(float);
  return partial_workspace_bytes(shape.rows, shape.heads, shape.head_dim, shape.max_entries_per_head);
}

cudaError_t sparse_attention(const SparseAttentionShape& shape, const float* q, const int32_t* query_positions,
                             const CompressedCacheView& cache, const float* key_dictionary,
                             const float* value_dictionary, const float* inv_freq, float* out, float* probabilities,
                             void* workspace, cudaStream_t stream) {
  if (!sparse_attention_supported(shape.heads, shape.kv_heads, shape.head_dim)) return cudaErrorNotSupported;
  if (shape.rows == 0) return cudaSuccess;
  const int max_entries = shape.max_entries_per_head;
  SparseOutputs outputs{out, probabilities, nullptr, {}, 1, std::max(max_entries, 1), shape.total_entries};
  cudaError_t error = cudaSuccess;
  if (probabilities != nullptr) {
    // Probabilities need each row's final softmax statistics in one block: no split.
    outputs.logit_workspace = static_cast<float*>(workspace);
    error = cudaMemsetAsync(probabilities, 0, size_t(outputs.total_entries) * sizeof(float), stream);
    if (error != cudaSuccess) return error;
  } else {
    outputs.splits = split_count(shape.rows, shape.kv_heads, max_entries);
    outputs.chunk = std::max(1, (max_entries + outputs.splits - 1) / outputs.splits);
    outputs.partial = partial_view(workspace, shape.rows, shape.heads, outputs.splits);
  }
  const dim3 grid(outputs.splits, shape.kv_heads, shape.rows);
  switch (shape.head_dim) {
    case 64:
      launch_sparse<1>(grid, stream, shape, q, query_positions, cache, key_dictionary, value_dictionary, inv_freq,
                       outputs);
      break;
    case 128:
      launch_sparse<2>(grid, stream, shape, q, query_positions, cache, key_dictionary, value_dictionary, inv_freq,
                       outputs);
      break;
    default:
      launch_sparse<4>(grid, stream, shape, q, query_positions, cache, key_dictionary, value_dictionary, inv_freq,
                       outputs);
  }
  if ((error = cudaGetLastError()) != cudaSuccess || outputs.splits == 1) return error;
  return combine_partials(outputs.partial, shape.rows, shape.heads, shape.head_dim, outputs.splits, out, stream);
}

cudaError_t matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int n, int sparsity,
                             uint16_t* indices, __half* coefficients, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  matching_pursuit_kernel<<<n, 256, dim * sizeof(float), stream>>>(dictionary, atoms, dim, x, sparsity, indices,
                                                                   coefficients);
  return cudaGetLastError();
}

cudaError_t key_l2_norms(const float* keys, int n, int head_dim, float* norms, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  key_l2_norms_kernel<<<(n * 32 + 255) / 256, 256, 0, stream>>>(keys, n, head_dim, norms);
  return cudaGetLastError();
}

cudaError_t merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                            float* slot_value, float* slot_tokens, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  merge_into_slot_kernel<<<(head_dim + 127) / 128, 128, 0, stream>>>(keys, values, count, head_dim, slot_key,
                                                                     slot_value, slot_tokens);
  add_tokens_kernel<<<1, 1, 0, stream>>>(slot_tokens, count);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
