// The attention scores and RefreshKV (the oracle: cpu/compressed/scoring.cc): update_scores decays and adds a
// step's probabilities; refresh_decide chooses each sequence's full or subset step; refresh_select pools a full
// step's probabilities by position and marks the entries the subset steps attend to.
#include <cstdint>

#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {
namespace {

// Grid (step sequences, kv_heads).
__global__ void update_scores_kernel(CompressedLayer layer, StepRowsView step, float decay,
                                     const float* dense_probabilities, const float* coded_probabilities) {
  const int64_t head = head_slot(layer, step, blockIdx.x, blockIdx.y);
  // Multiply and add rounded separately, as the CPU does (no fused multiply-add).
  for (int64_t slot = layer.dense_begin[head] + threadIdx.x; slot < layer.dense_begin[head] + layer.dense_count[head];
       slot += blockDim.x)
    layer.dense_scores[slot] = __fadd_rn(__fmul_rn(layer.dense_scores[slot], decay), dense_probabilities[slot]);
  if (layer.coded_count == nullptr) return;
  for (int64_t slot = layer.coded_begin[head] + threadIdx.x; slot < layer.coded_begin[head] + layer.coded_count[head];
       slot += blockDim.x)
    layer.coded_scores[slot] = __fadd_rn(__fmul_rn(layer.coded_scores[slot], decay), coded_probabilities[slot]);
}

// Grid (step sequences); one thread per dimension.
__global__ void refresh_decide_kernel(RefreshStateView state, StepRowsView step, RefreshSettings settings,
                                      const float* q, int heads, int head_dim) {
  const int j = blockIdx.x, sequence = step.sequence[j];
  const float* last = q + int64_t(step.row_begin[j + 1] - 1) * heads * head_dim;
  __shared__ double sums[3][kBlock];
  double dot = 0, mean_norm = 0, previous_norm = 0;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float mean = 0.0f;
    for (int h = 0; h < heads; ++h) mean = __fadd_rn(mean, __fdiv_rn(last[h * head_dim + d], float(heads)));
    state.step_query[int64_t(sequence) * head_dim + d] = mean;
    const float previous = state.query[int64_t(sequence) * head_dim + d];
    dot += double(mean) * previous;
    mean_norm += double(mean) * mean;
    previous_norm += double(previous) * previous;
  }
  sums[0][threadIdx.x] = dot;
  sums[1][threadIdx.x] = mean_norm;
  sums[2][threadIdx.x] = previous_norm;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int t = 1; t < blockDim.x; ++t) {
    dot += sums[0][t];
    mean_norm += sums[1][t];
    previous_norm += sums[2][t];
  }
  bool full = !state.has_query[sequence] || state.steps_since_refresh[sequence] + 1 >= settings.refresh_stride;
  if (!full && settings.query_similarity_threshold > 0.0f)
    full = dot / sqrt(fmax(mean_norm * previous_norm, 1e-30)) < settings.query_similarity_threshold;
  state.full_step[sequence] = full;
}

// Grid (step sequences, kv_heads). On a full step: probabilities scattered by position, max-pooled in place, the
// `selected` largest (pooled, position) keys marked.
__global__ void refresh_select_kernel(CompressedLayer layer, RefreshStateView state, StepRowsView step,
                                      StepTargets targets, RefreshSettings settings, float* dense_probabilities,
                                      float* coded_probabilities, int capacity, float* position_workspace) {
  const int j = blockIdx.x, h = blockIdx.y, sequence = step.sequence[j];
  if (!state.full_step[sequence]) {
    if (h == 0 && threadIdx.x == 0) ++state.steps_since_refresh[sequence];
    return;
  }
  const int64_t head = head_slot(layer, step, j, h);
  const int dense = layer.dense_count[head], coded = layer.coded_count ? layer.coded_count[head] : 0;
  const int n = dense + coded;
  const int32_t length = step_length(step, j);
  float* by_position = position_workspace + (int64_t(j) * layer.kv_heads + h) * capacity;
  auto position_of = [&](int e) {
    return e < dense ? layer.dense_positions[layer.dense_begin[head] + e]
                     : layer.coded_positions[layer.coded_begin[head] + e - dense];
  };
  auto probability_of = [&](int e) -> float& {
    return e < dense ? dense_probabilities[layer.dense_begin[head] + e]
                     : coded_probabilities[layer.coded_begin[head] + e - dense];
  };
  auto selected_of = [&](int e) -> uint8_t& {
    return e < dense ? layer.dense_selected[layer.dense_begin[head] + e]
                     : layer.coded_selected[layer.coded_begin[head] + e - dense];
  };
  for (int position = threadIdx.x; position < length; position += blockDim.x) by_position[position] = 0.0f;
  __syncthreads();
  for (int e = threadIdx.x; e < n; e += blockDim.x) by_position[position_of(e)] = probability_of(e);
  __syncthreads();
  // Absent positions hold 0 and probabilities are >= 0, so pooling over positions is pooling over entries.
  const int radius = settings.pool_kernel / 2;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int32_t position = position_of(e);
    float pooled = 0.0f;
    for (int32_t p = max(0, position - radius); p <= min(length - 1, position + radius); ++p)
      pooled = fmaxf(pooled, by_position[p]);
    probability_of(e) = pooled;
  }
  __syncthreads();
  const int keep = min(n, targets.selected[int64_t(j) * layer.kv_heads + h]);
  // Larger pooled probability first, then the newer position.
  auto key_of = [&](int e, uint64_t& key) {
    key = (uint64_t(ordered_bits(probability_of(e))) << 32) | uint32_t(position_of(e));
    return true;
  };
  const uint64_t threshold = keep > 0 ? block_kth_largest(n, keep, key_of) : ~0ull;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    uint64_t key;
    key_of(e, key);
    selected_of(e) = keep > 0 && key >= threshold;
  }
  if (h != 0) return;
  for (int d = threadIdx.x; d < layer.head_dim; d += blockDim.x)
    state.query[int64_t(sequence) * layer.head_dim + d] = state.step_query[int64_t(sequence) * layer.head_dim + d];
  if (threadIdx.x == 0) {
    state.refresh_position[sequence] = length;
    state.steps_since_refresh[sequence] = 0;
    state.has_query[sequence] = 1;
  }
}

}  // namespace

cudaError_t update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                          const float* dense_probabilities, const float* coded_probabilities, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  update_scores_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(
      layer, step, decay, dense_probabilities, coded_probabilities);
  return cudaGetLastError();
}

cudaError_t refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                           const float* q, int heads, int head_dim, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  refresh_decide_kernel<<<step.sequences, kBlock, 0, stream>>>(state, step, settings, q, heads, head_dim);
  return cudaGetLastError();
}

size_t refresh_select_workspace_bytes(int step_sequences, int kv_heads, int capacity) {
  return size_t(step_sequences) * kv_heads * capacity * sizeof(float);
}

cudaError_t refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                           const StepTargets& targets, const RefreshSettings& settings, float* dense_probabilities,
                           float* coded_probabilities, int capacity, float* position_workspace, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  refresh_select_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(
      layer, state, step, targets, settings, dense_probabilities, coded_probabilities, capacity, position_workspace);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
