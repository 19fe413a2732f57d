// evict (the oracle: cpu/compressed/eviction.cc): each (step sequence, KV head) selects its victims by score and
// position, merges them into the ZeroMerge slot when the policy merges, and compacts its dense and coded regions.
#include <cstdint>

#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {
namespace {

__device__ void move_coded_slots(const CompressedLayer& layer, const int* from, const int* to, int moves,
                                 int64_t base) {
  const int sk = layer.key_sparsity, sv = layer.value_sparsity, width = sk + sv;
  for (int index = threadIdx.x; index < moves * width; index += blockDim.x) {
    const int64_t source = base + from[index / width], target = base + to[index / width];
    const int c = index % width;
    if (c < sk)
      layer.key_codes[target * sk + c] = layer.key_codes[source * sk + c];
    else
      layer.value_codes[target * sv + c - sk] = layer.value_codes[source * sv + c - sk];
    if (c != 0) continue;
    layer.coded_positions[target] = layer.coded_positions[source];
    if (layer.coded_scores) layer.coded_scores[target] = layer.coded_scores[source];
    if (layer.coded_selected) layer.coded_selected[target] = layer.coded_selected[source];
  }
}

// A victim's key after RoPE and its value, two dimensions (a rotate-half pair) per thread.
__device__ void victim_pair(const CompressedLayer& layer, const CodingTables& tables, int64_t head, bool coded,
                            int index, int pair, float key[2], float value[2]) {
  const int hd = layer.head_dim, half = hd / 2;
  if (!coded) {
    const int64_t slot = layer.dense_begin[head] + index;
    key[0] = bf16_value(layer.dense_keys[slot * hd + pair]);
    key[1] = bf16_value(layer.dense_keys[slot * hd + pair + half]);
    value[0] = bf16_value(layer.dense_values[slot * hd + pair]);
    value[1] = bf16_value(layer.dense_values[slot * hd + pair + half]);
    return;
  }
  const int64_t slot = layer.coded_begin[head] + index;
  if (tables.key_bits > 0) {
    const uint32_t* key_words = layer.key_codes + slot * layer.key_sparsity;
    const uint32_t* value_words = layer.value_codes + slot * layer.value_sparsity;
    const QuantizedRange key_range = quantized_range(key_words), value_range = quantized_range(value_words);
    const float* channel_scale = tables.key_channel_scale + int64_t(head % layer.kv_heads) * hd;
    for (int k = 0; k < 2; ++k) {
      const int d = pair + k * half;
      key[k] = dequantized_channel(key_words, key_range, d, tables.key_bits, channel_scale);
      value[k] = dequantized_channel(value_words, value_range, d, tables.value_bits, nullptr);
    }
    return;
  }
  key[0] = key[1] = value[0] = value[1] = 0.0f;
  for (int s = 0; s < layer.key_sparsity; ++s) {
    const uint32_t code = layer.key_codes[slot * layer.key_sparsity + s];
    const float* atom = tables.key_atoms + int64_t(code_atom(code)) * hd;
    key[0] += code_coefficient(code) * atom[pair];
    key[1] += code_coefficient(code) * atom[pair + half];
  }
  if (!tables.keys_after_rope) {
    float c, s;
    rope_factors(layer.coded_positions[slot], tables.inv_freq[pair], tables.rope_attention_factor, c, s);
    const float a = key[0], b = key[1];
    key[0] = a * c - b * s;
    key[1] = b * c + a * s;
  }
  for (int s = 0; s < layer.value_sparsity; ++s) {
    const uint32_t code = layer.value_codes[slot * layer.value_sparsity + s];
    const float* atom = tables.value_atoms + int64_t(code_atom(code)) * hd;
    value[0] += code_coefficient(code) * atom[pair];
    value[1] += code_coefficient(code) * atom[pair + half];
  }
}

// Grid (step sequences, kv_heads).
__global__ void __launch_bounds__(kBlock) evict_kernel(CompressedLayer layer, CodingTables tables, StepRowsView step,
                                                       StepTargets targets, EvictionSettings settings) {
  const int j = blockIdx.x, h = blockIdx.y;
  const int64_t head = head_slot(layer, step, j, h);
  const int dense = layer.dense_count[head], coded = layer.coded_count ? layer.coded_count[head] : 0;
  const int n = coded + dense;  // entry e: coded index e, or dense index e - coded
  int excess = n - targets.kept[int64_t(j) * layer.kv_heads + h];
  if (excess <= 0) return;
  const int32_t protected_from = step_length(step, j) - settings.protected_recent;
  auto position_of = [&](int e) {
    return e < coded ? layer.coded_positions[layer.coded_begin[head] + e]
                     : layer.dense_positions[layer.dense_begin[head] + e - coded];
  };
  auto candidate = [&](int32_t position) { return position >= settings.sink_tokens && position < protected_from; };
  // The host's target never asks for more than the candidates (KeptTokens counts sinks and the protected window
  // in), so the count of victims found below is the excess; taking that count keeps the kernel in bounds anyway.
  // Larger key = evicted first: the higher norm (or lower attention score), then the older position.
  auto key_of = [&](int e, uint64_t& key) {
    const int32_t position = position_of(e);
    if (!candidate(position)) return false;
    const float score = e < coded ? layer.coded_scores[layer.coded_begin[head] + e]
                                  : layer.dense_scores[layer.dense_begin[head] + e - coded];
    const uint32_t order = settings.keep_low_key_norms ? ordered_bits(score) : ~ordered_bits(score);
    key = (uint64_t(order) << 32) | uint32_t(~uint32_t(position));
    return true;
  };
  const uint64_t threshold = block_kth_largest(n, excess, key_of);

  __shared__ int victim_count;
  __shared__ int victim_entry[kMaxEvictionsPerStep];
  __shared__ int32_t victim_position[kMaxEvictionsPerStep];
  __shared__ int by_position[kMaxEvictionsPerStep];
  __shared__ int dense_removed[kMaxEvictionsPerStep], coded_removed[kMaxEvictionsPerStep];
  __shared__ int move_from[kMaxEvictionsPerStep], move_to[kMaxEvictionsPerStep];
  __shared__ int dense_victims, coded_victims;
  if (threadIdx.x == 0) victim_count = 0;
  __syncthreads();
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    uint64_t key;
    if (!key_of(e, key) || key < threshold) continue;
    const int v = atomicAdd(&victim_count, 1);
    if (v >= kMaxEvictionsPerStep) continue;
    victim_entry[v] = e;
    victim_position[v] = position_of(e);
  }
  __syncthreads();
  excess = min(victim_count, kMaxEvictionsPerStep);
  // Victims ranked by position (merge order), and per region by slot (compaction order).
  if (threadIdx.x == 0) dense_victims = coded_victims = 0;
  for (int v = threadIdx.x; v < excess; v += blockDim.x) {
    int position_rank = 0, region_rank = 0;
    const bool in_coded = victim_entry[v] < coded;
    for (int u = 0; u < excess; ++u) {
      position_rank += victim_position[u] < victim_position[v];
      region_rank += (victim_entry[u] < coded) == in_coded && victim_entry[u] < victim_entry[v];
    }
    by_position[position_rank] = victim_entry[v];
    if (in_coded)
      coded_removed[region_rank] = victim_entry[v];
    else
      dense_removed[region_rank] = victim_entry[v] - coded;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int v = 0; v < excess; ++v) (victim_entry[v] < coded ? coded_victims : dense_victims) += 1;
  __syncthreads();

  if (settings.merge_evicted) {
    const int half = layer.head_dim / 2;
    float tokens = layer.merged_tokens[head];
    for (int pair = threadIdx.x; pair < half; pair += blockDim.x) {
      float* merged_key = layer.merged_keys + head * layer.head_dim;
      float* merged_value = layer.merged_values + head * layer.head_dim;
      // An empty slot holds whatever a reset or a reused allocation left (NaN included): start its means afresh.
      const bool empty = tokens == 0.0f;
      float mean_key[2] = {empty ? 0.0f : merged_key[pair], empty ? 0.0f : merged_key[pair + half]};
      float mean_value[2] = {empty ? 0.0f : merged_value[pair], empty ? 0.0f : merged_value[pair + half]};
      float count = tokens;
      for (int v = 0; v < excess; ++v) {
        const int e = by_position[v];
        float key[2], value[2];
        victim_pair(layer, tables, head, e < coded, e < coded ? e : e - coded, pair, key, value);
        count += 1.0f;
        for (int k = 0; k < 2; ++k) {
          mean_key[k] += __fdiv_rn(key[k] - mean_key[k], count);
          mean_value[k] += __fdiv_rn(value[k] - mean_value[k], count);
        }
      }
      merged_key[pair] = mean_key[0];
      merged_key[pair + half] = mean_key[1];
      merged_value[pair] = mean_value[0];
      merged_value[pair + half] = mean_value[1];
    }
    __syncthreads();
    if (threadIdx.x == 0) layer.merged_tokens[head] = tokens + float(excess);
  }

  int moves = compaction_moves(dense_removed, dense_victims, dense, move_from, move_to);
  move_dense_slots(layer, move_from, move_to, moves, layer.dense_begin[head]);
  __syncthreads();
  if (coded_victims > 0) {
    moves = compaction_moves(coded_removed, coded_victims, coded, move_from, move_to);
    move_coded_slots(layer, move_from, move_to, moves, layer.coded_begin[head]);
  }
  if (threadIdx.x == 0) {
    layer.dense_count[head] = dense - dense_victims;
    if (coded_victims > 0) layer.coded_count[head] = coded - coded_victims;
  }
}

}  // namespace

cudaError_t evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                  const StepTargets& targets, const EvictionSettings& settings, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  evict_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(layer, tables ? *tables : CodingTables{},
                                                                            step, targets, settings);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
