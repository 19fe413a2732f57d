// The compressed layer cache's operations on the device (kernels/compressed_layout.h), each the counterpart of
// the kernels/cpu_reference.h function of the same name. Per-head work (append, eviction, coding, selection)
// runs one block per (step sequence, KV head); attention is split-KV over every row. Entry counts live in device
// memory and are read by the blocks themselves, so no launch depends on a length the host would have to read.
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include <cooperative_groups.h>

#include "base/number_formats.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"
#include "kernels/cuda/vector_loads.cuh"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;
constexpr int kBlock = 256;  // threads of the per-head kernels

__device__ inline int64_t head_slot(const CompressedLayer& layer, const StepRowsView& step, int j, int kv_head) {
  return int64_t(step.sequence[j]) * layer.kv_heads + kv_head;
}

__device__ inline int32_t step_length(const StepRowsView& step, int j) {
  return step.row_position[step.row_begin[j + 1] - 1] + 1;
}

__device__ inline float bf16_value(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }
__device__ inline uint16_t bf16_bits(float value) { return __bfloat16_as_ushort(__float2bfloat16(value)); }
__device__ inline float code_coefficient(uint32_t code) { return __half2float(__ushort_as_half(uint16_t(code >> 16))); }
__device__ inline uint32_t code_atom(uint32_t code) { return code & 0xffff; }
// fp16 as the CPU stores coefficients: round to nearest even, saturating at the largest finite value.
__device__ inline uint16_t saturated_fp16_bits(float value) {
  return __half_as_ushort(__float2half_rn(fminf(fmaxf(value, -65504.0f), 65504.0f)));
}
__device__ inline float fp16_value(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// A quantized vector's scale and minimum (word 0, kernels/compressed_layout.h).
struct QuantizedRange {
  float scale, minimum;
};
__device__ inline QuantizedRange quantized_range(const uint32_t* words) {
  const uint32_t word = words[0];
  return {fp16_value(uint16_t(word & 0xffff)), fp16_value(uint16_t(word >> 16))};
}
// Channel d of a quantized vector as cpu::dequantize_vector rounds it: a multiply and an add, not fused.
__device__ inline float dequantized_channel(const uint32_t* words, const QuantizedRange& range, int d, int bits,
                                            const float* channel_scale) {
  const float value = __fadd_rn(range.minimum, __fmul_rn(range.scale, float(QuantizedLevel(words, d, bits))));
  return channel_scale != nullptr ? __fmul_rn(value, channel_scale[d]) : value;
}

// cos and sin of position * inv_freq as cpu::apply_rope forms them (double angle), scaled by the YaRN factor.
__device__ inline void rope_factors(int32_t position, float inv_freq, float attention_factor, float& c, float& s) {
  double sin_angle, cos_angle;
  sincos(double(position) * inv_freq, &sin_angle, &cos_angle);
  c = float(cos_angle) * attention_factor;
  s = float(sin_angle) * attention_factor;
}

// Floats as unsigned keys that order like the floats.
__device__ inline uint32_t ordered_bits(float value) {
  const uint32_t bits = __float_as_uint(value);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

// The largest valid key (0 when none is valid).
template <typename KeyOf>
__device__ uint64_t block_largest(int n, KeyOf key_of) {
  __shared__ unsigned long long warp_largest[kBlock / 32];
  unsigned long long largest = 0;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    uint64_t key;
    if (key_of(e, key)) largest = max(largest, (unsigned long long)key);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) largest = max(largest, __shfl_xor_sync(0xffffffff, largest, offset));
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_largest[threadIdx.x / 32] = largest;
  __syncthreads();
  for (int w = 0; w < (int(blockDim.x) + 31) / 32; ++w) largest = max(largest, warp_largest[w]);
  return largest;
}

// The k-th largest (1 <= k <= valid keys) of the keys key_of(e, &key) reports valid for e in [0, n), by radix
// selection one byte at a time from the top. Keys must be unique, so exactly k keys are >= the result. Every
// thread of the block calls it and gets the result.
template <typename KeyOf>
__device__ uint64_t block_kth_largest(int n, int k, KeyOf key_of) {
  if (k == 1) return block_largest(n, key_of);  // a decode step's usual eviction: one pass, not eight
  __shared__ unsigned histogram[256];
  __shared__ uint64_t shared_prefix;
  __shared__ int shared_remaining;
  uint64_t prefix = 0;
  int remaining = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0;
    __syncthreads();
    const uint64_t decided = shift == 56 ? 0 : ~0ull << (shift + 8);
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      uint64_t key;
      if (!key_of(e, key) || (key & decided) != prefix) continue;
      atomicAdd(&histogram[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int bin = 255;
      for (; bin > 0 && int(histogram[bin]) < remaining; --bin) remaining -= int(histogram[bin]);
      shared_prefix = prefix | (uint64_t(bin) << shift);
      shared_remaining = remaining;
    }
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    __syncthreads();
  }
  return prefix;
}

// --- Per-slot moves shared by eviction and coding --------------------------------------------------------------

__device__ void move_dense_slots(const CompressedLayer& layer, const int* from, const int* to, int moves,
                                 int64_t base) {
  const int hd = layer.head_dim;
  for (int index = threadIdx.x; index < moves * hd; index += blockDim.x) {
    const int64_t source = base + from[index / hd], target = base + to[index / hd];
    const int d = index % hd;
    layer.dense_keys[target * hd + d] = layer.dense_keys[source * hd + d];
    layer.dense_values[target * hd + d] = layer.dense_values[source * hd + d];
    if (d != 0) continue;
    layer.dense_positions[target] = layer.dense_positions[source];
    if (layer.dense_scores) layer.dense_scores[target] = layer.dense_scores[source];
    if (layer.dense_selected) layer.dense_selected[target] = layer.dense_selected[source];
  }
}

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

// cpu::CompactionMoves for a region of `live` slots whose removed slots are `removed` (ascending, count of them):
// fills from[] / to[] (shared, kMaxEvictionsPerStep each) and returns the number of moves. All threads call it.
__device__ int compaction_moves(const int* removed, int count, int live, int* from, int* to) {
  __shared__ uint8_t removed_tail[kMaxEvictionsPerStep];  // removed marks of slots [live - count, live)
  __shared__ int moves;
  const int remaining = live - count;
  for (int t = threadIdx.x; t < count; t += blockDim.x) removed_tail[t] = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < count; t += blockDim.x)
    if (removed[t] >= remaining) removed_tail[removed[t] - remaining] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    int holes = 0, movers = 0;
    while (holes < count && removed[holes] < remaining) to[holes] = removed[holes], ++holes;
    for (int t = 0; t < count; ++t)
      if (!removed_tail[t]) from[movers++] = remaining + t;
    moves = holes;  // == movers: every hole below `remaining` is matched by a survivor at or past it
  }
  __syncthreads();
  return moves;
}

// --- Append -----------------------------------------------------------------------------------------------------

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

// --- Attention ----------------------------------------------------------------------------------------------------

// Lane l of a warp owns kPairs rotate-half pairs: dims (l + 32 i) and (l + 32 i + head_dim / 2), so RoPE is
// lane-local and dictionary rows are read coalesced.
template <int kPairs>
struct LaneVector {
  float low[kPairs], high[kPairs];
};

template <int kPairs>
__device__ void decode_lane(const float* dictionary, const uint32_t* codes, int sparsity, int lane,
                            LaneVector<kPairs>& out) {
  constexpr int kHalf = kPairs * 32;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) out.low[i] = out.high[i] = 0.0f;
  for (int s = 0; s < sparsity; ++s) {
    const uint32_t code = codes[s];
    const float* atom = dictionary + int64_t(code_atom(code)) * 2 * kHalf;
    const float c = code_coefficient(code);
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      out.low[i] += c * atom[lane + 32 * i];
      out.high[i] += c * atom[kHalf + lane + 32 * i];
    }
  }
}

template <int kPairs>
__device__ void dequantize_lane(const uint32_t* words, int bits, const float* channel_scale, int lane,
                                LaneVector<kPairs>& out) {
  constexpr int kHalf = kPairs * 32;
  const QuantizedRange range = quantized_range(words);
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    out.low[i] = dequantized_channel(words, range, lane + 32 * i, bits, channel_scale);
    out.high[i] = dequantized_channel(words, range, kHalf + lane + 32 * i, bits, channel_scale);
  }
}

// One entry of a head as attention sees it: key after RoPE, value, position, logit bias.
template <int kPairs>
struct EntryReader {
  CompressedLayer layer;
  CodingTables tables;
  int64_t head;
  int coded, dense;
  bool merged;
  float merge_bias;

  __device__ int entries() const { return coded + dense + (merged ? 1 : 0); }

  // Position of entry e, and whether a row on a refresh subset step sees it (selected or new enough).
  __device__ int32_t position(int e) const {
    if (e < coded) return layer.coded_positions[layer.coded_begin[head] + e];
    if (e < coded + dense) return layer.dense_positions[layer.dense_begin[head] + e - coded];
    return INT32_MIN;  // the merged slot: seen by every row
  }
  __device__ bool selected(int e) const {
    if (e < coded) return layer.coded_selected[layer.coded_begin[head] + e];
    if (e < coded + dense) return layer.dense_selected[layer.dense_begin[head] + e - coded];
    return true;
  }

  __device__ void read(int e, int32_t position, int lane, LaneVector<kPairs>& key, LaneVector<kPairs>& value,
                       float& bias) const {
    constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
    bias = 0.0f;
    if (e < coded && tables.key_bits > 0) {
      const int64_t slot = layer.coded_begin[head] + e;
      dequantize_lane<kPairs>(layer.key_codes + slot * layer.key_sparsity, tables.key_bits,
                              tables.key_channel_scale + int64_t(head % layer.kv_heads) * kHeadDim, lane, key);
      dequantize_lane<kPairs>(layer.value_codes + slot * layer.value_sparsity, tables.value_bits, nullptr, lane, value);
    } else if (e < coded) {
      const int64_t slot = layer.coded_begin[head] + e;
      decode_lane<kPairs>(tables.key_atoms, layer.key_codes + slot * layer.key_sparsity, layer.key_sparsity, lane, key);
      if (!tables.keys_after_rope) {
#pragma unroll
        for (int i = 0; i < kPairs; ++i) {
          // The angle is reduced to [0, 2 pi) in double (fp32 would be ~1e-3 rad off at position 32K); the sine
          // and cosine of the reduced angle are then cheap and exact enough in fp32.
          constexpr double kTwoPi = 6.283185307179586;
          double angle = double(position) * tables.inv_freq[lane + 32 * i];
          angle -= kTwoPi * floor(angle / kTwoPi);
          float s, c;
          sincosf(float(angle), &s, &c);
          c *= tables.rope_attention_factor;
          s *= tables.rope_attention_factor;
          const float a = key.low[i], b = key.high[i];
          key.low[i] = a * c - b * s;
          key.high[i] = b * c + a * s;
        }
      }
      decode_lane<kPairs>(tables.value_atoms, layer.value_codes + slot * layer.value_sparsity, layer.value_sparsity,
                          lane, value);
    } else if (e < coded + dense) {
      const int64_t slot = layer.dense_begin[head] + e - coded;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        key.low[i] = bf16_value(layer.dense_keys[slot * kHeadDim + lane + 32 * i]);
        key.high[i] = bf16_value(layer.dense_keys[slot * kHeadDim + kHalf + lane + 32 * i]);
        value.low[i] = bf16_value(layer.dense_values[slot * kHeadDim + lane + 32 * i]);
        value.high[i] = bf16_value(layer.dense_values[slot * kHeadDim + kHalf + lane + 32 * i]);
      }
    } else {
      const float* merged_key = layer.merged_keys + head * kHeadDim;
      const float* merged_value = layer.merged_values + head * kHeadDim;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        key.low[i] = merged_key[lane + 32 * i];
        key.high[i] = merged_key[kHalf + lane + 32 * i];
        value.low[i] = merged_value[lane + 32 * i];
        value.high[i] = merged_value[kHalf + lane + 32 * i];
      }
      bias = merge_bias;
    }
  }
};

template <int kPairs>
__device__ EntryReader<kPairs> make_reader(const CompressedLayer& layer, const CodingTables& tables, int64_t head,
                                           float merge_compensation) {
  EntryReader<kPairs> reader{layer, tables, head, 0, layer.dense_count[head], false, 0.0f};
  if (layer.coded_count != nullptr) reader.coded = layer.coded_count[head];
  if (layer.merged_tokens != nullptr && layer.merged_tokens[head] > 0.0f) {
    reader.merged = true;
    reader.merge_bias = merge_compensation * logf(layer.merged_tokens[head]);
  }
  return reader;
}

// Which entries a row's sequence sees this step beyond causality: all, or on a RefreshKV subset step the
// selected ones and those at or after the refresh position.
struct ViewFilter {
  bool subset = false;
  int32_t refresh_position = 0;
  template <typename Reader>
  __device__ bool sees(const Reader& reader, int e, int32_t position) const {
    return !subset || position >= refresh_position || reader.selected(e);
  }
  // The same for a slot of a region whose selection flags are `selected`.
  __device__ bool sees_slot(const uint8_t* selected, int64_t slot, int32_t position) const {
    return !subset || position >= refresh_position || selected[slot];
  }
};

__device__ inline ViewFilter view_filter(const RefreshStateView& refresh, bool has_refresh, int sequence) {
  ViewFilter filter;
  if (has_refresh && !refresh.full_step[sequence]) {
    filter.subset = true;
    filter.refresh_position = refresh.refresh_position[sequence];
  }
  return filter;
}

struct AttentionLaunch {
  CompressedLayer layer;
  CodingTables tables;
  StepRowsView step;
  RefreshStateView refresh;
  bool has_refresh;
  CompressedAttentionShape shape;
  const float* q;
  __nv_bfloat16* out;
  float* row_stats;
  PartialView partial;
  int splits;
  // The split path only (see below): its launches cover rows [first_row, first_row + grid rows) of the step.
  int first_row;
  float* table;              // [rows, kv_heads, table_stride]: the query-atom table, group_width values per atom
  int table_stride;          // floats per (row, KV head) of the table
  float* weights;            // [rows, heads, splits, atoms]: each split's softmax weight per value atom
  float* combine_partials;   // [rows, heads, atom chunks + 1, head_dim]: the combine blocks' shares of the output
  int32_t* combined_blocks;  // [rows, kv_heads]: combine blocks finished, so the last one writes the output
};

// Grid (splits, kv_heads, rows). kWarps warps walk the split's entries of the head, each with its own online
// softmax per group head; the split's share comes from the head's live count, read here.
template <int kPairs, int kGroup>
__global__ void __launch_bounds__(kWarps * 32) compressed_attention_kernel(AttentionLaunch p) {
  constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
  const int split = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int heads = p.shape.heads, group = heads / p.layer.kv_heads;
  const int sequence = p.step.row_sequence[row];
  const int32_t query_position = p.step.row_position[row];
  const EntryReader<kPairs> reader = make_reader<kPairs>(
      p.layer, p.tables, int64_t(sequence) * p.layer.kv_heads + kv_head, p.shape.merge_compensation);
  const ViewFilter filter = view_filter(p.refresh, p.has_refresh, sequence);
  const int entries = reader.entries();
  const int used = min(p.splits, max(1, (entries + kMinChunk - 1) / kMinChunk));
  const int chunk = (entries + used - 1) / used;

  LaneVector<kPairs> query[kGroup], acc[kGroup];
  float running_max[kGroup], running_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    running_max[g] = -FLT_MAX;
    running_sum[g] = 0.0f;
    const float* source = p.q + (int64_t(row) * heads + kv_head * group + (g < group ? g : 0)) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      query[g].low[i] = g < group ? source[lane + 32 * i] * p.shape.scale : 0.0f;
      query[g].high[i] = g < group ? source[kHalf + lane + 32 * i] * p.shape.scale : 0.0f;
      acc[g].low[i] = acc[g].high[i] = 0.0f;
    }
  }
  const int split_end = split < used ? min(entries, (split + 1) * chunk) : 0;
  for (int e = split * chunk + warp; e < split_end; e += kWarps) {
    const int32_t position = reader.position(e);
    if (position > query_position || !filter.sees(reader, e, position)) continue;
    LaneVector<kPairs> key, value;
    float bias;
    reader.read(e, position, lane, key, value, bias);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (g >= group) break;
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) dot += query[g].low[i] * key.low[i] + query[g].high[i] * key.high[i];
      const float logit = warp_sum(dot) + bias;
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
  for (int index = threadIdx.x; index < group * kHeadDim; index += blockDim.x) {
    const int g = index / kHeadDim, d = index % kHeadDim, query_head = kv_head * group + g;
    const SoftmaxState merged = states.merge(g, d);
    if (p.splits > 1) {
      const int64_t slot = (int64_t(row) * heads + query_head) * p.splits + split;
      p.partial.acc[slot * kHeadDim + d] = merged.acc;
      if (d == 0) {
        p.partial.max[slot] = merged.max;
        p.partial.sum[slot] = merged.sum;
      }
      continue;
    }
    p.out[(int64_t(row) * heads + query_head) * kHeadDim + d] =
        __float2bfloat16(merged.sum > 0.0f ? merged.acc / merged.sum : 0.0f);
    if (d == 0 && p.row_stats != nullptr) {
      p.row_stats[(int64_t(row) * heads + query_head) * 2] = merged.max;
      p.row_stats[(int64_t(row) * heads + query_head) * 2 + 1] = merged.sum;
    }
  }
}

int compressed_splits(int rows, int kv_heads, int max_region) { return split_count(rows, kv_heads, max_region); }

template <int kPairs>
void launch_compressed_attention(const AttentionLaunch& launch, int group, cudaStream_t stream) {
  const dim3 grid(launch.splits, launch.layer.kv_heads, launch.step.rows);
  constexpr int kThreads = kWarps * 32;
  if (group <= 1)
    compressed_attention_kernel<kPairs, 1><<<grid, kThreads, 0, stream>>>(launch);
  else if (group <= 2)
    compressed_attention_kernel<kPairs, 2><<<grid, kThreads, 0, stream>>>(launch);
  else if (group <= 4)
    compressed_attention_kernel<kPairs, 4><<<grid, kThreads, 0, stream>>>(launch);
  else
    compressed_attention_kernel<kPairs, kMaxGroup><<<grid, kThreads, 0, stream>>>(launch);
}

// --- Attention: the split path --------------------------------------------------------------------------------------
//
// Layers with no coded entries, layers whose keys were coded after RoPE, and quantized layers take this path; the
// kernel above rebuilds every coded key and value from its dictionary rows in every lane, which makes a coded entry
// cost more than a dense one. Here:
// - a coded key's logit is sum_s c_s * T[atom_s], where T = (scale * q) . key_atoms is computed once per step and
//   query head by a small tiled kernel (every head shares the dictionary) and gathered from shared memory;
// - a coded value is never rebuilt: each split adds its softmax weights per value atom (w_a += p * c_s) in shared
//   memory, and the combine applies the value dictionary once per query head: out = (acc + sum_a w_a v_a) / sum;
// - dense entries are read as the dense kernel reads its cache: a group of head_dim / 8 lanes owns an entry, one
//   16-byte load each for K and V, several entries in flight per warp;
// - a quantized layer's coded entries are read the same way, each lane dequantizing its 8 dimensions.
// Launches: table (coded layers only), split kernel, combine, each after the first a programmatic dependent of the one
// before. Their grids depend only on the rows, kv_heads and max_region; each block reads its head's counts from device
// memory. bench/coded_attention_tuning.md has the measurements behind the choices.

constexpr int kSplitWarps = 8;
constexpr int kSplitThreads = kSplitWarps * 32;
// A dense entry reads 512 bytes at head_dim 128 and a coded one about 70 (codes and position) plus its shared-memory
// gathers, so for sizing splits a dense entry counts as kDenseEntryWork coded ones. A split takes at least kSplitWork:
// 64 dense entries, as the dense kernel's chunks, or 512 coded ones, so that the per-split atom weights it leaves for
// the combine (group * atoms floats) stay small next to the codes it read. (Against 1024, 512 took 4K from 34.2 to
// 29.5 us and left 32K alone, where the wave bounds the splits; 256 measured no better.)
constexpr int kDenseEntryWork = 8;
constexpr int kSplitWork = 512;
constexpr int kMaxSplits = 256;            // bounds the combine's per-split factors in shared memory
constexpr int kCodedEntriesPerThread = 2;  // coded entries each thread holds per tile of the coded pass
constexpr int kRowsPerTableLaunch = 32;    // bounds the table and weights in the workspace for prefill-sized steps
constexpr int kTableTile = 32;             // atoms, and query vectors, per block of the table kernel
constexpr int kTableDims = 128;            // dimensions staged per step of the table kernel: head_dim 128 in one
constexpr int kCombineAtoms = 64;          // value atoms per combine block
constexpr int kWeightBits = 30;            // the atom weights' fixed-point units stay under 2^kWeightBits
constexpr int kInitialWeightExponent = 100;

// Group sizes the kernels are built for: the GQA group rounded up to 1, 2, 4 or 8 query heads.
KVPLAN_HOST_DEVICE constexpr int group_width(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kMaxGroup;
}
// Two blocks per SM where the group's query and accumulator registers allow (at most 128 per thread), else one.
KVPLAN_HOST_DEVICE constexpr int split_blocks_per_sm(int group_width) { return group_width <= 4 ? 2 : 1; }
KVPLAN_HOST_DEVICE constexpr int round_up_4(int n) { return (n + 3) / 4 * 4; }

// The split kernel's dynamic shared memory, in 4-byte words: the query-atom table for the group (reused for the
// warps' softmax states once the coded pass is done), the atom weights, each warp's per-tile maxima and coefficient
// sum (two tiles' worth, by parity), and the per-warp coded sums.
struct SplitSharedLayout {
  int weights, tile_stats, coded_sums, floats;
};
KVPLAN_HOST_DEVICE inline SplitSharedLayout split_shared_layout(int head_dim, int width, int atoms, bool coded) {
  const int states = kSplitWarps * width * (head_dim + 2);  // WarpSoftmaxStates<kSplitWarps, width, head_dim>
  const int table = coded ? round_up_4(width * atoms) : 0;
  SplitSharedLayout layout;
  layout.weights = round_up_4(states > table ? states : table);
  layout.tile_stats = layout.weights + (coded ? round_up_4(width * atoms) : 0);
  layout.coded_sums = layout.tile_stats + 2 * kSplitWarps * (width + 1);
  layout.floats = layout.coded_sums + kSplitWarps * width;
  return layout;
}

// The workspace of one launch of the split path, carved from `base` (nullptr: only its size).
struct SplitWorkspace {
  PartialView partial;
  float* table;
  int table_stride;
  float* weights;
  float* combine_partials;
  int32_t* combined_blocks;
  size_t bytes;
};
inline SplitWorkspace split_workspace(void* base, int rows, int heads, int kv_heads, int head_dim, int atoms,
                                      int splits) {
  const int width = group_width(heads / kv_heads), atom_chunks = (atoms + kCombineAtoms - 1) / kCombineAtoms;
  SplitWorkspace workspace{};
  workspace.table_stride = round_up_4(width * atoms);
  char* cursor = static_cast<char*>(base);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    char* start = cursor == nullptr ? nullptr : cursor + offset;
    offset += (bytes + 15) / 16 * 16;
    return start;
  };
  const int64_t slots = int64_t(rows) * heads * splits;
  float* partial = reinterpret_cast<float*>(take(slots * (2 + head_dim) * sizeof(float)));
  workspace.partial = base == nullptr ? PartialView{} : partial_view(partial, rows, heads, splits);
  if (atoms > 0) {
    workspace.table = reinterpret_cast<float*>(take(int64_t(rows) * kv_heads * workspace.table_stride * sizeof(float)));
    workspace.weights = reinterpret_cast<float*>(take(slots * atoms * sizeof(float)));
    workspace.combine_partials =
        reinterpret_cast<float*>(take(int64_t(rows) * heads * (atom_chunks + 1) * head_dim * sizeof(float)));
    workspace.combined_blocks = reinterpret_cast<int32_t*>(take(int64_t(rows) * kv_heads * sizeof(int32_t)));
  }
  workspace.bytes = offset;
  return workspace;
}

int multiprocessors() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// Splits per (row, KV head): as many as one wave of resident blocks holds, no more than max_region allows at the
// least work per split (all dense, the worst case), at most kMaxSplits.
int split_path_splits(int sms, int rows, int kv_heads, int group, int max_region) {
  const int wave = sms * split_blocks_per_sm(group_width(group));
  const int wanted = std::max(1, wave / (rows * kv_heads));
  const int dense_per_split = kSplitWork / kDenseEntryWork;
  const int most = std::min(kMaxSplits, std::max(1, (max_region + dense_per_split - 1) / dense_per_split));
  return std::min(wanted, most);
}

// How a head's entries fall to the splits: the used splits take equal shares of its coded entries and of its dense
// ones; how many are used follows the head's work, where a quantized entry, read as a dense one is, counts as one.
// The split kernel and the combine both derive it from the counts.
struct SplitShare {
  int used;
  int coded_begin, coded_end, dense_begin, dense_end;
};
__device__ inline SplitShare split_share(int coded, int dense, bool quantized, int splits, int split) {
  const int64_t coded_work = quantized ? kDenseEntryWork : 1;
  const int64_t work = int64_t(dense) * kDenseEntryWork + int64_t(coded) * coded_work;
  const int used = int(min(int64_t(splits), max(int64_t(1), (work + kSplitWork - 1) / kSplitWork)));
  const int coded_chunk = (coded + used - 1) / used, dense_chunk = (dense + used - 1) / used;
  return {used, min(coded, split * coded_chunk), min(coded, (split + 1) * coded_chunk), min(dense, split * dense_chunk),
          min(dense, (split + 1) * dense_chunk)};
}

struct HeadCounts {
  int coded, dense;
  bool merged;
};
__device__ inline HeadCounts head_counts(const CompressedLayer& layer, int64_t head) {
  return {layer.coded_count != nullptr ? layer.coded_count[head] : 0, layer.dense_count[head],
          layer.merged_tokens != nullptr && layer.merged_tokens[head] > 0.0f};
}

__device__ inline uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

__device__ inline void copy_async_16(void* shared_target, const void* global_source) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared_target));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global_source));
}
__device__ inline void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Programmatic dependent launch: the next kernel of the chain (launched by launch_dependent) may start its prologue,
// which reads nothing this kernel writes, once every block of this one has allowed it; it waits for this kernel's
// completion, and the visibility of its writes, before reading them.
__device__ inline void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ inline void wait_for_prerequisite() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

__device__ inline void prefetch_to_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(address));
}

// Grid (atom tiles, query tiles). T[row, kv_head, atom, g] = (scale * q[row, kv_head * group + g]) . key_atoms[atom]
// for the launch's rows, 0 for the padding heads of a group narrower than its width. A block stages kTableTile query
// vectors and kTableTile dictionary rows through shared memory kTableDims dimensions at a time; a thread owns one
// atom (its lane) for four query vectors (its warp's). Rows padded by 4 floats keep the 16-byte row reads of the 8
// lanes of each phase on distinct banks. Block (0, 0) also clears the combine's counters for this launch.
// Every block lets the split kernel start at once: its prologue and first codes load while the table is computed.
__global__ void __launch_bounds__(kSplitThreads) query_atom_table_kernel(AttentionLaunch p, int rows) {
  __shared__ __align__(16) float queries[kTableTile][kTableDims + 4];
  __shared__ __align__(16) float atoms[kTableTile][kTableDims + 4];
  const int kv_heads = p.layer.kv_heads, head_dim = p.layer.head_dim, atom_count = p.tables.atoms;
  const int group = p.shape.heads / kv_heads, width = group_width(group);
  const int vectors = rows * kv_heads * width;
  const int atom_base = blockIdx.x * kTableTile, vector_base = blockIdx.y * kTableTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  allow_dependent_launch();
  if (blockIdx.x == 0 && blockIdx.y == 0)
    for (int i = threadIdx.x; i < rows * kv_heads; i += blockDim.x) p.combined_blocks[i] = 0;

  // Query vector v of the launch: (row, KV head, g) = v's digits in (rows, kv_heads, width).
  auto query_source = [&](int v) -> const float* {
    const int g = v % width, pair = v / width;
    if (v >= vectors || g >= group) return nullptr;
    const int row = p.first_row + pair / kv_heads, kv_head = pair % kv_heads;
    return p.q + (int64_t(row) * p.shape.heads + kv_head * group + g) * head_dim;
  };
  float acc[4] = {};
  for (int d0 = 0; d0 < head_dim; d0 += kTableDims) {
    __syncthreads();  // the last step's reads are done
    // Dimensions past head_dim (head_dim 64 fills half a step) stage as zeros, which add nothing to the dots.
    for (int i = threadIdx.x; i < kTableTile * kTableDims / 4; i += blockDim.x) {
      const int r = i / (kTableDims / 4), d = d0 + i % (kTableDims / 4) * 4;
      const float* query = d < head_dim ? query_source(vector_base + r) : nullptr;
      float4 q4 = query != nullptr ? *reinterpret_cast<const float4*>(query + d) : float4{};
      q4 = {q4.x * p.shape.scale, q4.y * p.shape.scale, q4.z * p.shape.scale, q4.w * p.shape.scale};
      *reinterpret_cast<float4*>(&queries[r][d - d0]) = q4;
      const int atom = atom_base + r;
      *reinterpret_cast<float4*>(&atoms[r][d - d0]) =
          atom < atom_count && d < head_dim
              ? *reinterpret_cast<const float4*>(p.tables.key_atoms + int64_t(atom) * head_dim + d)
              : float4{};
    }
    __syncthreads();
#pragma unroll 4
    for (int d = 0; d < kTableDims; d += 4) {
      const float4 a4 = *reinterpret_cast<const float4*>(&atoms[lane][d]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 q4 = *reinterpret_cast<const float4*>(&queries[warp * 4 + j][d]);
        acc[j] += q4.x * a4.x + q4.y * a4.y + q4.z * a4.z + q4.w * a4.w;
      }
    }
  }
  const int atom = atom_base + lane;
  if (atom >= atom_count) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int v = vector_base + warp * 4 + j;
    if (v >= vectors) break;
    const int g = v % width, pair = v / width;
    p.table[int64_t(pair) * p.table_stride + int64_t(atom) * width + g] = acc[j];
  }
}

// Grid (splits, kv_heads, rows of the launch), kSplitThreads threads. One split of one (row, KV head): its share of
// the coded entries, then its share of the dense entries (and on split 0 the merged slot), merged into one partial
// softmax state per query head of the group (max, sum, unnormalised dense output and, on coded layers, the weight of
// every value atom, all relative to that max). Coded first, so that the dense pass's query and accumulator registers
// are not held across the coded pass (they made it spill at group 4).
//
// The coded pass goes in tiles of kSplitThreads * kCodedEntriesPerThread entries, one entry per thread at a time:
// logits from the table, then the block's running max (one barrier; the atom weights are rescaled in the rare tile
// that raises it, behind a second), then every visible entry adds p * c to the weights of its value atoms.
// kMaxCodes bounds the sparsities (multiples of 4: codes load 16 bytes at a time).
//
// The atom weights are fixed point, w = units * 2^-exponent, added with native integer atomics: a float atomic add
// on shared memory is a compare-and-swap loop that the hardware runs one lane at a time (about 17 us per tile of 512
// entries, measured). Each p <= 1 (relative to the running max), so the units' magnitudes stay under bound *
// 2^exponent, bound being the sum of |c| over the value codes added so far; the exponent keeps that under 2^30
// (resolution about 2^-30 of the bound, no overflow) and falls, with a rescale, as the bound grows.
//
// kQuantized (then not kCoded): the coded entries of a quantized layer, read before the dense ones as those are.
template <int kHeadDim, int kGroup, bool kCoded, int kMaxCodes, bool kQuantized>
__global__ void __launch_bounds__(kSplitThreads, split_blocks_per_sm(kGroup))
    compressed_split_kernel(AttentionLaunch p) {
  constexpr int kLanesPerEntry = kHeadDim / 8;
  constexpr int kEntriesPerStep = 32 / kLanesPerEntry;
  // Entries per lane group in flight: as the dense kernel, fewer on coded and quantized layers, whose dense entries
  // are few (and whose quantized pass spilled at group 4 beside four in flight).
  constexpr int kUnroll = kGroup <= 4 && !kCoded && !kQuantized ? 4 : 2;
  constexpr int kEntriesPerWarpTile = kEntriesPerStep * kUnroll;
  constexpr int kBlockTileStride = kSplitWarps * kEntriesPerWarpTile;
  constexpr int kCodeVectors = kMaxCodes / 4;
  using States = WarpSoftmaxStates<kSplitWarps, kGroup, kHeadDim>;
  extern __shared__ __align__(16) float shared[];

  const int split = blockIdx.x, kv_head = blockIdx.y, launch_row = blockIdx.z, row = p.first_row + launch_row;
  const int heads = p.shape.heads, group = heads / p.layer.kv_heads;
  const int sequence = p.step.row_sequence[row];
  const int32_t query_position = p.step.row_position[row];
  const int64_t head = int64_t(sequence) * p.layer.kv_heads + kv_head;
  const HeadCounts counts = head_counts(p.layer, head);
  const SplitShare share = split_share(counts.coded, counts.dense, p.tables.key_bits > 0, p.splits, split);
  allow_dependent_launch();
  if (split >= share.used) return;
  const ViewFilter filter = view_filter(p.refresh, p.has_refresh, sequence);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int atoms = p.tables.atoms;
  const int entry_slot = lane / kLanesPerEntry, dim_base = (lane % kLanesPerEntry) * 8;
  const int64_t dense_base = p.layer.dense_begin[head];
  const int warp_begin = share.dense_begin + warp * kEntriesPerWarpTile;
  const SplitSharedLayout layout = split_shared_layout(kHeadDim, kGroup, atoms, kCoded);
  float* table = shared;                                                   // [atoms][kGroup]
  int32_t* weights = reinterpret_cast<int32_t*>(shared + layout.weights);  // [kGroup][atoms], fixed point

  // On coded layers the dense share's first tile heads for L2 during the coded pass (the query rows are there: the
  // table kernel read them), and the table kernel may still be running until the first tile of codes has loaded.
  if constexpr (kCoded) {
    for (int i = threadIdx.x; i < kGroup * atoms; i += kSplitThreads) weights[i] = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t slot = dense_base + warp_begin + u * kEntriesPerStep + entry_slot;
      if (warp_begin + u * kEntriesPerStep + entry_slot >= share.dense_end) break;
      prefetch_to_l2(p.layer.dense_keys + slot * kHeadDim + dim_base);
      prefetch_to_l2(p.layer.dense_values + slot * kHeadDim + dim_base);
      prefetch_to_l2(p.layer.dense_positions + slot);
    }
  }

  // Coded entries. `reference` is the block's running max of the coded logits, and `weight_exponent` and
  // `coefficient_bound` the weights' scale (all the same in every thread): the atom weights and each thread's
  // coded_sum are relative to the reference.
  float reference[kGroup], coded_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    reference[g] = -INFINITY;
    coded_sum[g] = 0.0f;
  }
  int weight_exponent = kInitialWeightExponent;
  float* tile_stats = shared + layout.tile_stats;  // [2][kSplitWarps][kGroup + 1], by tile parity
  float* coded_sums = shared + layout.coded_sums;  // [kSplitWarps][kGroup]
  if constexpr (kCoded) {
    const int key_sparsity = p.layer.key_sparsity, value_sparsity = p.layer.value_sparsity;
    const int64_t coded_base = p.layer.coded_begin[head];
    float coefficient_bound = 0.0f;
    int parity = 0;
    for (int tile = share.coded_begin; tile < share.coded_end;
         tile += kSplitThreads * kCodedEntriesPerThread, parity ^= 1) {
      uint4 key_codes[kCodedEntriesPerThread][kCodeVectors], value_codes[kCodedEntriesPerThread][kCodeVectors];
      int32_t position[kCodedEntriesPerThread];
      bool visible[kCodedEntriesPerThread];
#pragma unroll
      for (int k = 0; k < kCodedEntriesPerThread; ++k) {
        const int entry = tile + k * kSplitThreads + threadIdx.x;
        const bool valid = entry < share.coded_end;
        const int64_t slot = coded_base + entry;
#pragma unroll
        for (int c = 0; c < kCodeVectors; ++c) {
          key_codes[k][c] = valid && 4 * c < key_sparsity
                                ? __ldg(reinterpret_cast<const uint4*>(p.layer.key_codes + slot * key_sparsity) + c)
                                : make_uint4(0, 0, 0, 0);
          value_codes[k][c] =
              valid && 4 * c < value_sparsity
                  ? __ldg(reinterpret_cast<const uint4*>(p.layer.value_codes + slot * value_sparsity) + c)
                  : make_uint4(0, 0, 0, 0);
        }
        position[k] = valid ? p.layer.coded_positions[slot] : INT32_MAX;
        visible[k] = position[k] <= query_position && filter.sees_slot(p.layer.coded_selected, slot, position[k]);
      }
      if (tile == share.coded_begin) {
        wait_for_prerequisite();
        const float* source = p.table + (int64_t(launch_row) * p.layer.kv_heads + kv_head) * p.table_stride;
        for (int i = threadIdx.x * 4; i < kGroup * atoms; i += kSplitThreads * 4) copy_async_16(table + i, source + i);
        wait_async_copies();
        __syncthreads();
      }
      float logit[kCodedEntriesPerThread][kGroup], coefficient_sum = 0.0f;
#pragma unroll
      for (int k = 0; k < kCodedEntriesPerThread; ++k) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) logit[k][g] = 0.0f;
#pragma unroll
        for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (4 * c + i >= key_sparsity) break;
            const uint32_t code = word(key_codes[k][c], i);
            float row[kGroup];
            load_floats<kGroup>(table + code_atom(code) * kGroup, row);
            const float coefficient = code_coefficient(code);
#pragma unroll
            for (int g = 0; g < kGroup; ++g) logit[k][g] += coefficient * row[g];
          }
        }
#pragma unroll
        for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (4 * c + i < value_sparsity && visible[k])
              coefficient_sum += fabsf(code_coefficient(word(value_codes[k][c], i)));
        }
#pragma unroll
        for (int g = 0; g < kGroup; ++g) logit[k][g] = visible[k] ? logit[k][g] : -INFINITY;
      }
      // The tile's max and coefficient sum over the block.
      float* stats = tile_stats + (parity * kSplitWarps + warp) * (kGroup + 1);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float thread_max = logit[0][g];
#pragma unroll
        for (int k = 1; k < kCodedEntriesPerThread; ++k) thread_max = fmaxf(thread_max, logit[k][g]);
        thread_max = warp_max(thread_max);
        if (lane == 0) stats[g] = thread_max;
      }
      coefficient_sum = warp_sum(coefficient_sum);
      if (lane == 0) stats[kGroup] = coefficient_sum;
      __syncthreads();
      float factor[kGroup];
      bool rescale = false;
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float tile_max = -INFINITY;
        for (int w = 0; w < kSplitWarps; ++w)
          tile_max = fmaxf(tile_max, tile_stats[(parity * kSplitWarps + w) * (kGroup + 1) + g]);
        const float new_reference = fmaxf(reference[g], tile_max);
        factor[g] = new_reference > reference[g] ? __expf(reference[g] - new_reference) : 1.0f;
        rescale |= new_reference > reference[g] && reference[g] > -INFINITY;
        reference[g] = new_reference;
        coded_sum[g] *= factor[g];
      }
      for (int w = 0; w < kSplitWarps; ++w)
        coefficient_bound += tile_stats[(parity * kSplitWarps + w) * (kGroup + 1) + kGroup];
      int exponent = weight_exponent;
      if (coefficient_bound > 0.0f) {
        int bound_exponent;  // coefficient_bound < 2^bound_exponent
        frexpf(coefficient_bound, &bound_exponent);
        exponent = min(exponent, kWeightBits - bound_exponent);
      }
      if (rescale || exponent < weight_exponent) {  // the same in every thread
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const float scale = ldexpf(factor[g], exponent - weight_exponent);
          for (int a = threadIdx.x; a < atoms; a += kSplitThreads)
            weights[g * atoms + a] = __float2int_rn(float(weights[g * atoms + a]) * scale);
        }
        __syncthreads();
      }
      weight_exponent = exponent;
      const float unit = ldexpf(1.0f, weight_exponent);
#pragma unroll
      for (int k = 0; k < kCodedEntriesPerThread; ++k) {
        if (!visible[k]) continue;
        float probability[kGroup];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          probability[g] = __expf(logit[k][g] - reference[g]);
          coded_sum[g] += probability[g];
        }
#pragma unroll
        for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (4 * c + i >= value_sparsity) break;
            const uint32_t code = word(value_codes[k][c], i);
            const float units = code_coefficient(code) * unit;
#pragma unroll
            for (int g = 0; g < kGroup; ++g)
              if (g < group) atomicAdd(&weights[g * atoms + code_atom(code)], __float2int_rn(probability[g] * units));
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float warp_total = warp_sum(coded_sum[g]);
      coded_sum[g] = warp_total;
    }
    // A split without coded entries still waits for the table kernel, so that this kernel's completion (which the
    // combine waits for) implies that kernel's: the combine's counters are cleared there.
    if (share.coded_begin == share.coded_end) wait_for_prerequisite();
    __syncthreads();  // every gather from the table is done before the states overwrite it
  }

  // Dense entries, as the dense kernel reads them; out-of-share entries load as zeros and score -inf.
  float query[kGroup][8], acc[kGroup][8], running_max[kGroup], running_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    running_max[g] = -FLT_MAX;
    running_sum[g] = 0.0f;
    const float4* source = reinterpret_cast<const float4*>(
        p.q + (int64_t(row) * heads + kv_head * group + (g < group ? g : 0)) * kHeadDim + dim_base);
    const float4 low = source[0], high = source[1];
    const float loaded[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      acc[g][i] = 0.0f;
      query[g][i] = loaded[i] * p.shape.scale;
    }
  }
  if constexpr (kQuantized) {
    const int64_t coded_base = p.layer.coded_begin[head];
    float key_scale[8];
    load_floats<8>(p.tables.key_channel_scale + int64_t(kv_head) * kHeadDim + dim_base, key_scale);
    for (int first = share.coded_begin + warp * kEntriesPerStep; first < share.coded_end;
         first += kSplitWarps * kEntriesPerStep) {
      const int entry = first + entry_slot;
      const int64_t slot = coded_base + entry;
      const int32_t position = entry < share.coded_end ? p.layer.coded_positions[slot] : INT32_MAX;
      const bool visible = position <= query_position && filter.sees_slot(p.layer.coded_selected, slot, position);
      float key[8] = {}, value[8] = {};
      if (entry < share.coded_end) {
        const uint32_t* key_words = p.layer.key_codes + slot * p.layer.key_sparsity;
        const uint32_t* value_words = p.layer.value_codes + slot * p.layer.value_sparsity;
        const QuantizedRange key_range = quantized_range(key_words), value_range = quantized_range(value_words);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          key[i] = __fmul_rn(dequantized_channel(key_words, key_range, dim_base + i, p.tables.key_bits, nullptr),
                             key_scale[i]);
          value[i] = dequantized_channel(value_words, value_range, dim_base + i, p.tables.value_bits, nullptr);
        }
      }
      float score[1][kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float dot = lane_group_dot<kLanesPerEntry>(query[g], key);
        score[0][g] = visible ? dot : -INFINITY;
      }
      rescale_to_tile(score, running_max, running_sum, acc);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float weight = __expf(score[0][g] - running_max[g]);
        running_sum[g] += weight;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] += weight * value[i];
      }
    }
  }
  const uint16_t* keys = p.layer.dense_keys + dense_base * kHeadDim + dim_base;
  const uint16_t* values = p.layer.dense_values + dense_base * kHeadDim + dim_base;
  auto load_tile = [&](const uint16_t* cache, int first_entry, uint4(&bits)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int entry = first_entry + u * kEntriesPerStep + entry_slot;
      bits[u] = entry < share.dense_end ? __ldg(reinterpret_cast<const uint4*>(cache + int64_t(entry) * kHeadDim))
                                        : make_uint4(0, 0, 0, 0);
    }
  };
  // Keys run one tile ahead: the next tile's keys load while this tile's values are summed.
  uint4 key_bits[kUnroll];
  load_tile(keys, warp_begin, key_bits);
  for (int tile = warp_begin; tile < share.dense_end; tile += kBlockTileStride) {
    uint4 value_bits[kUnroll];
    load_tile(values, tile, value_bits);
    bool visible[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int entry = tile + u * kEntriesPerStep + entry_slot;
      const int32_t position = entry < share.dense_end ? p.layer.dense_positions[dense_base + entry] : INT32_MAX;
      visible[u] = position <= query_position && filter.sees_slot(p.layer.dense_selected, dense_base + entry, position);
    }
    float score[kUnroll][kGroup];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float key[8];
      unpack_bf16x8(key_bits[u], key);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float dot = lane_group_dot<kLanesPerEntry>(query[g], key);
        score[u][g] = visible[u] ? dot : -INFINITY;
      }
    }
    load_tile(keys, tile + kBlockTileStride, key_bits);
    rescale_to_tile(score, running_max, running_sum, acc);
    add_tile_values(score, value_bits, running_max, running_sum, acc);
  }
  // The merged slot (fp32, seen by every row, with its logit bias) joins entry slot 0 of warp 0 on split 0.
  if (split == 0 && counts.merged && warp == 0) {
    const float bias = p.shape.merge_compensation * logf(p.layer.merged_tokens[head]);
    float key[8], value[8];
    load_floats<8>(p.layer.merged_keys + head * kHeadDim + dim_base, key);
    load_floats<8>(p.layer.merged_values + head * kHeadDim + dim_base, value);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float dot = lane_group_dot<kLanesPerEntry>(query[g], key);
      if (entry_slot != 0) continue;
      const float logit = dot + bias, new_max = fmaxf(running_max[g], logit);
      const float correction = __expf(running_max[g] - new_max), weight = __expf(logit - new_max);
      running_max[g] = new_max;
      running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * correction + weight * value[i];
    }
  }
  // Merge the entry slots of the warp.
  merge_entry_slots<kLanesPerEntry>(running_max, running_sum, acc);

  States& states = *reinterpret_cast<States*>(shared);
  if (lane < kLanesPerEntry) states.publish_lane_group(warp, lane, dim_base, running_max, running_sum, acc);
  if (kCoded && lane == 0)
#pragma unroll
    for (int g = 0; g < kGroup; ++g) coded_sums[warp * kGroup + g] = coded_sum[g];
  __syncthreads();

  // The split's state per query head: the dense part (merged over warps) and the coded part brought to one max.
  // Every thread derives the factors it needs; the first `group` threads publish max and sum.
  float dense_factor[kGroup], coded_factor[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    float dense_max = -FLT_MAX, dense_sum = 0.0f, coded_total = 0.0f;
    for (int w = 0; w < kSplitWarps; ++w) dense_max = fmaxf(dense_max, states.max[w][g]);
    for (int w = 0; w < kSplitWarps; ++w) {
      if (states.sum[w][g] > 0.0f) dense_sum += states.sum[w][g] * __expf(states.max[w][g] - dense_max);
      if (kCoded) coded_total += coded_sums[w * kGroup + g];
    }
    float split_max = dense_sum > 0.0f ? dense_max : -FLT_MAX;
    if (coded_total > 0.0f) split_max = fmaxf(split_max, reference[g]);
    dense_factor[g] = dense_sum > 0.0f ? __expf(dense_max - split_max) : 0.0f;
    coded_factor[g] = coded_total > 0.0f ? __expf(reference[g] - split_max) : 0.0f;
    if (threadIdx.x == g && g < group) {
      const int64_t slot = (int64_t(launch_row) * heads + kv_head * group + g) * p.splits + split;
      p.partial.max[slot] = split_max;
      p.partial.sum[slot] = dense_sum * dense_factor[g] + coded_total * coded_factor[g];
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= group) break;
    const int64_t slot = (int64_t(launch_row) * heads + kv_head * group + g) * p.splits + split;
    for (int d = threadIdx.x; d < kHeadDim; d += kSplitThreads)
      p.partial.acc[slot * kHeadDim + d] = states.merge(g, d).acc * dense_factor[g];
    if constexpr (kCoded) {
      const float scale = ldexpf(coded_factor[g], -weight_exponent);
      for (int a = threadIdx.x; a < atoms; a += kSplitThreads)
        p.weights[slot * atoms + a] = float(weights[g * atoms + a]) * scale;
    }
  }
}

// Grid (atom chunks + group, kv_heads, rows of the launch), kSplitThreads threads. Every block weighs the row's splits
// per query head (exp(split max - max)); block x < atom chunks merges the splits' weights of its kCombineAtoms value
// atoms and multiplies them into those dictionary rows, block atom chunks + g merges query head g's dense
// accumulators. Each leaves its share of the output in the workspace and the last block to finish (a counter the
// table kernel cleared) adds the shares and writes the bf16 output and row_stats. Without coded entries (no atom
// chunks) each head's block writes its output itself. Loads over the splits are spread across the block's threads so
// that they are in flight together: a loop of dependent L2 round trips per thread would cost more than the merging.
template <int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kSplitThreads) compressed_combine_kernel(AttentionLaunch p) {
  constexpr int kDimsPerLane = kHeadDim / 32;
  constexpr int kWeightSlices = kSplitThreads / kCombineAtoms;  // threads per atom merging weights
  constexpr int kAtomSlices = kSplitThreads / kHeadDim;         // threads per output dimension applying them
  const int heads = p.shape.heads, group = heads / p.layer.kv_heads;
  const int chunk = blockIdx.x, chunks = gridDim.x - group, kv_head = blockIdx.y, launch_row = blockIdx.z;
  const int row = p.first_row + launch_row;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, atoms = p.tables.atoms;
  const int64_t head = int64_t(p.step.row_sequence[row]) * p.layer.kv_heads + kv_head;
  const HeadCounts counts = head_counts(p.layer, head);
  const int used = split_share(counts.coded, counts.dense, p.tables.key_bits > 0, p.splits, 0).used;
  const int64_t first_slot = (int64_t(launch_row) * heads + kv_head * group) * p.splits;  // query head g: + g * splits
  // An atom block's dictionary rows load before the split kernel has finished: thread (d, slice) takes dimension d
  // of atoms slice, slice + kAtomSlices, ...
  const int first_atom = chunk * kCombineAtoms, chunk_atoms = min(kCombineAtoms, atoms - first_atom);
  const int dim = threadIdx.x % kHeadDim, atom_slice = threadIdx.x / kHeadDim;
  float value[kCombineAtoms / kAtomSlices];
#pragma unroll
  for (int i = 0; i < kCombineAtoms / kAtomSlices; ++i) {
    const int a = atom_slice + i * kAtomSlices;
    value[i] =
        chunk < chunks && a < chunk_atoms ? p.tables.value_atoms[int64_t(first_atom + a) * kHeadDim + dim] : 0.0f;
  }
  wait_for_prerequisite();

  __shared__ float split_factor[kGroup][kMaxSplits];
  __shared__ float head_max[kGroup], head_sum[kGroup];
  if (warp < group) {
    const int64_t base = first_slot + int64_t(warp) * p.splits;
    float max = -FLT_MAX;
    for (int s = lane; s < used; s += 32)
      if (p.partial.sum[base + s] > 0.0f) max = fmaxf(max, p.partial.max[base + s]);
    max = warp_max(max);
    float sum = 0.0f;
    for (int s = lane; s < used; s += 32) {
      const float split_sum = p.partial.sum[base + s];
      const float factor = split_sum > 0.0f ? __expf(p.partial.max[base + s] - max) : 0.0f;
      split_factor[warp][s] = factor;
      sum += split_sum * factor;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      head_max[warp] = max;
      head_sum[warp] = sum;
    }
  }
  __syncthreads();

  auto write_output = [&](int g, int d, float total) {
    const int64_t query_head = int64_t(row) * heads + kv_head * group + g;
    p.out[query_head * kHeadDim + d] = __float2bfloat16(head_sum[g] > 0.0f ? total / head_sum[g] : 0.0f);
    if (d == 0 && p.row_stats != nullptr) {
      p.row_stats[query_head * 2] = head_max[g];
      p.row_stats[query_head * 2 + 1] = head_sum[g];
    }
  };
  // Share x of query head g's output: x < chunks from the atom blocks, x == chunks the dense accumulators.
  auto share_of = [&](int g, int x) {
    return p.combine_partials + ((int64_t(launch_row) * heads + kv_head * group + g) * (chunks + 1) + x) * kHeadDim;
  };
  if (chunk >= chunks) {
    // Query head g's dense accumulators: warp w takes splits w, w + kSplitWarps, ..., lane l dimensions
    // [l * kDimsPerLane, (l + 1) * kDimsPerLane).
    const int g = chunk - chunks;
    __shared__ __align__(16) float warp_totals[kSplitWarps][kHeadDim];
    float total[kDimsPerLane] = {};
    for (int s = warp; s < used; s += kSplitWarps) {
      float acc[kDimsPerLane];
      load_floats<kDimsPerLane>(
          p.partial.acc + (first_slot + int64_t(g) * p.splits + s) * kHeadDim + lane * kDimsPerLane, acc);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) total[i] += split_factor[g][s] * acc[i];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) warp_totals[warp][lane * kDimsPerLane + i] = total[i];
    __syncthreads();
    for (int d = threadIdx.x; d < kHeadDim; d += kSplitThreads) {
      float merged = 0.0f;
#pragma unroll
      for (int w = 0; w < kSplitWarps; ++w) merged += warp_totals[w][d];
      if (chunks == 0)
        write_output(g, d, merged);
      else
        share_of(g, chunks)[d] = merged;
    }
    if (chunks == 0) return;
  } else {
    __shared__ float slice_weights[kWeightSlices][kGroup][kCombineAtoms];
    __shared__ float merged_weights[kGroup][kCombineAtoms];
    __shared__ float slice_totals[kAtomSlices][kGroup][kHeadDim];
    {
      const int a = threadIdx.x % kCombineAtoms, slice = threadIdx.x / kCombineAtoms;
      float total[kGroup] = {};
      if (a < chunk_atoms) {
        for (int s = slice; s < used; s += kWeightSlices) {
#pragma unroll
          for (int g = 0; g < kGroup; ++g)
            if (g < group)
              total[g] +=
                  split_factor[g][s] * p.weights[(first_slot + int64_t(g) * p.splits + s) * atoms + first_atom + a];
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) slice_weights[slice][g][a] = total[g];
    }
    __syncthreads();
    for (int index = threadIdx.x; index < kGroup * kCombineAtoms; index += kSplitThreads) {
      const int g = index / kCombineAtoms, a = index % kCombineAtoms;
      float total = 0.0f;
#pragma unroll
      for (int slice = 0; slice < kWeightSlices; ++slice) total += slice_weights[slice][g][a];
      merged_weights[g][a] = total;
    }
    __syncthreads();
    float total[kGroup] = {};
#pragma unroll
    for (int i = 0; i < kCombineAtoms / kAtomSlices; ++i)
#pragma unroll
      for (int g = 0; g < kGroup; ++g) total[g] += merged_weights[g][atom_slice + i * kAtomSlices] * value[i];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) slice_totals[atom_slice][g][dim] = total[g];
    __syncthreads();
    for (int index = threadIdx.x; index < group * kHeadDim; index += kSplitThreads) {
      const int g = index / kHeadDim, d = index % kHeadDim;
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < kAtomSlices; ++s) sum += slice_totals[s][g][d];
      share_of(g, chunk)[d] = sum;
    }
  }

  // The last of the row's blocks adds the shares in a fixed order.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    last = atomicAdd(&p.combined_blocks[int64_t(launch_row) * p.layer.kv_heads + kv_head], 1) == chunks + group - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int index = threadIdx.x; index < group * kHeadDim; index += kSplitThreads) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    float total = 0.0f;
    for (int x = 0; x <= chunks; ++x) total += __ldcg(share_of(g, x) + d);
    write_output(g, d, total);
  }
}

// Whether a layer takes the split path, and with which code bound: uncoded and quantized layers always; dictionary
// coded ones when their keys were coded after RoPE, their sparsities are multiples of 4 up to 16, and the group's
// table and atom weights fit in shared memory beside the merge area.
struct SplitPathChoice {
  bool taken;
  int max_codes;  // 0: no dictionary codes
  size_t shared_bytes;
  bool quantized = false;
};
SplitPathChoice choose_split_path(const CompressedLayer& layer, const CodingTables* tables, int group) {
  const bool coded = layer.coded_count != nullptr && layer.key_sparsity > 0;
  const int width = group_width(group);
  const size_t uncoded_bytes = split_shared_layout(layer.head_dim, width, 0, false).floats * sizeof(float);
  if (!coded) return {true, 0, uncoded_bytes};
  if (tables != nullptr && tables->key_bits > 0) return {true, 0, uncoded_bytes, true};
  const int most_codes = std::max(layer.key_sparsity, layer.value_sparsity);
  if (tables == nullptr || !tables->keys_after_rope || layer.key_sparsity % 4 != 0 || layer.value_sparsity % 4 != 0 ||
      most_codes > 16)
    return {false, 0, 0};
  const size_t bytes = split_shared_layout(layer.head_dim, width, tables->atoms, true).floats * sizeof(float);
  int device = 0, limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      bytes > size_t(limit))
    return {false, 0, 0};
  return {true, most_codes <= 8 ? 8 : 16, bytes};
}

// Launches `kernel` as a programmatic dependent of the kernel before it in the stream: it may start once every block
// of that kernel has called allow_dependent_launch(), and calls wait_for_prerequisite() before reading its results.
// This hides most of a launch and the prologue of each kernel of the chain behind the one before.
template <typename Kernel>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, size_t shared_bytes, cudaStream_t stream,
                             const AttentionLaunch& launch) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kSplitThreads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, launch);
}

// The split kernel follows the table kernel as a programmatic dependent on coded layers; without codes the kernel
// before it is the caller's, whose results its first reads need, so it launches plainly.
template <int kHeadDim, int kGroup, bool kCoded, int kMaxCodes, bool kQuantized = false>
cudaError_t launch_split_kernel(const AttentionLaunch& launch, int rows, size_t shared_bytes, cudaStream_t stream) {
  const auto kernel = compressed_split_kernel<kHeadDim, kGroup, kCoded, kMaxCodes, kQuantized>;
  if (shared_bytes > 48 * 1024) {
    if (const cudaError_t error =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
        error != cudaSuccess)
      return error;
  }
  const dim3 grid(launch.splits, launch.layer.kv_heads, rows);
  if (kCoded) return launch_dependent(kernel, grid, shared_bytes, stream, launch);
  kernel<<<grid, kSplitThreads, shared_bytes, stream>>>(launch);
  return cudaGetLastError();
}

template <int kHeadDim, int kGroup>
cudaError_t launch_split_path(AttentionLaunch launch, const SplitPathChoice& choice, void* workspace,
                              cudaStream_t stream) {
  const int kv_heads = launch.layer.kv_heads, heads = launch.shape.heads, group = heads / kv_heads;
  const int atoms = choice.max_codes > 0 ? launch.tables.atoms : 0;
  const int atom_chunks = (atoms + kCombineAtoms - 1) / kCombineAtoms;
  const int rows_per_launch = atoms > 0 ? kRowsPerTableLaunch : launch.step.rows, sms = multiprocessors();
  for (int first_row = 0; first_row < launch.step.rows; first_row += rows_per_launch) {
    const int rows = std::min(rows_per_launch, launch.step.rows - first_row);
    launch.first_row = first_row;
    launch.splits = split_path_splits(sms, rows, kv_heads, group, launch.shape.max_region);
    const SplitWorkspace carved = split_workspace(workspace, rows, heads, kv_heads, kHeadDim, atoms, launch.splits);
    launch.partial = carved.partial;
    launch.table = carved.table;
    launch.table_stride = carved.table_stride;
    launch.weights = carved.weights;
    launch.combine_partials = carved.combine_partials;
    launch.combined_blocks = carved.combined_blocks;
    cudaError_t error = cudaSuccess;
    if (atoms > 0) {
      const int vectors = rows * kv_heads * group_width(group);
      query_atom_table_kernel<<<dim3((atoms + kTableTile - 1) / kTableTile, (vectors + kTableTile - 1) / kTableTile),
                                kSplitThreads, 0, stream>>>(launch, rows);
      if ((error = cudaGetLastError()) != cudaSuccess) return error;
    }
    if (choice.quantized)
      error = launch_split_kernel<kHeadDim, kGroup, false, 8, true>(launch, rows, choice.shared_bytes, stream);
    else if (choice.max_codes == 0)
      error = launch_split_kernel<kHeadDim, kGroup, false, 8>(launch, rows, choice.shared_bytes, stream);
    else if (choice.max_codes == 8)
      error = launch_split_kernel<kHeadDim, kGroup, true, 8>(launch, rows, choice.shared_bytes, stream);
    else
      error = launch_split_kernel<kHeadDim, kGroup, true, 16>(launch, rows, choice.shared_bytes, stream);
    if (error != cudaSuccess) return error;
    const dim3 combine_grid(atom_chunks + group, kv_heads, rows);
    error = launch_dependent(compressed_combine_kernel<kHeadDim, kGroup>, combine_grid, 0, stream, launch);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

template <int kHeadDim>
cudaError_t launch_split_path_for_group(const AttentionLaunch& launch, const SplitPathChoice& choice, void* workspace,
                                        cudaStream_t stream) {
  switch (group_width(launch.shape.heads / launch.layer.kv_heads)) {
    case 1: return launch_split_path<kHeadDim, 1>(launch, choice, workspace, stream);
    case 2: return launch_split_path<kHeadDim, 2>(launch, choice, workspace, stream);
    case 4: return launch_split_path<kHeadDim, 4>(launch, choice, workspace, stream);
    default: return launch_split_path<kHeadDim, kMaxGroup>(launch, choice, workspace, stream);
  }
}

// --- Probabilities ------------------------------------------------------------------------------------------------

constexpr int kProbabilityEntriesPerBlock = 64;

struct ProbabilityLaunch {
  CompressedLayer layer;
  CodingTables tables;
  StepRowsView step;
  RefreshStateView refresh;
  bool has_refresh, full_steps_only;
  CompressedAttentionShape shape;
  const float* q;
  const float* row_stats;
  float* dense_probabilities;
  float* coded_probabilities;
};

// Grid (entry blocks, kv_heads, step sequences); a warp per entry computes its logit for every row of the
// sequence and query head of the group, and keeps the largest probability.
template <int kPairs>
__global__ void __launch_bounds__(kWarps * 32) entry_probabilities_kernel(ProbabilityLaunch p) {
  constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
  const int kv_head = blockIdx.y, j = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sequence = p.step.sequence[j];
  if (p.full_steps_only && !p.refresh.full_step[sequence]) return;
  const int heads = p.shape.heads, group = heads / p.layer.kv_heads;
  const int64_t head = int64_t(sequence) * p.layer.kv_heads + kv_head;
  const EntryReader<kPairs> reader = make_reader<kPairs>(p.layer, p.tables, head, 0.0f);
  const ViewFilter filter = view_filter(p.refresh, p.has_refresh, sequence);
  const int plain = reader.coded + reader.dense;
  const int begin = blockIdx.x * kProbabilityEntriesPerBlock;
  const int end = min(plain, begin + kProbabilityEntriesPerBlock);
  for (int e = begin + warp; e < end; e += kWarps) {
    const int32_t position = reader.position(e);
    float probability = 0.0f;
    if (filter.sees(reader, e, position)) {
      LaneVector<kPairs> key, value;
      float bias;
      reader.read(e, position, lane, key, value, bias);
      for (int row = p.step.row_begin[j]; row < p.step.row_begin[j + 1]; ++row) {
        if (position > p.step.row_position[row]) continue;
        for (int g = 0; g < group; ++g) {
          const int64_t query_head = int64_t(row) * heads + kv_head * group + g;
          const float* query = p.q + query_head * kHeadDim;
          float dot = 0.0f;
#pragma unroll
          for (int i = 0; i < kPairs; ++i)
            dot += query[lane + 32 * i] * key.low[i] + query[kHalf + lane + 32 * i] * key.high[i];
          const float logit = warp_sum(dot) * p.shape.scale;
          const float max = p.row_stats[query_head * 2], sum = p.row_stats[query_head * 2 + 1];
          if (sum > 0.0f) probability = fmaxf(probability, __expf(logit - max) / sum);
        }
      }
    }
    if (lane != 0) continue;
    if (e < reader.coded)
      p.coded_probabilities[p.layer.coded_begin[head] + e] = probability;
    else
      p.dense_probabilities[p.layer.dense_begin[head] + e - reader.coded] = probability;
  }
}

// --- Scores and RefreshKV ---------------------------------------------------------------------------------------

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

// --- Eviction -----------------------------------------------------------------------------------------------------

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

// --- Coding what leaves the window --------------------------------------------------------------------------------

// Grid (step sequences, kv_heads).
__global__ void gather_leaving_kernel(CompressedLayer layer, CodingTables tables, StepRowsView step, int coding_window,
                                      int max_leaving, float* keys, float* values, int32_t* leaving_slots,
                                      int32_t* leaving_count) {
  const int j = blockIdx.x, h = blockIdx.y, hd = layer.head_dim, half = hd / 2;
  const int64_t head = head_slot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
  const int32_t leaves_before = step_length(step, j) - coding_window;
  // Slot order is the order both backends code in: the leaving slots are compacted in order, a block-wide
  // stretch of the dense region at a time, each thread's place counted from the ballots of the lanes before it.
  __shared__ int count;
  __shared__ int warp_counts[kBlock / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const int64_t dense_begin = layer.dense_begin[head];
  const int dense = layer.dense_count[head];
  for (int stretch = 0; stretch < dense; stretch += kBlock) {
    const int e = stretch + threadIdx.x;
    const bool leaves = e < dense && layer.dense_positions[dense_begin + e] < leaves_before;
    const unsigned ballot = __ballot_sync(0xffffffffu, leaves);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int place = count + __popc(ballot & ((1u << lane) - 1));
    for (int w = 0; w < warp; ++w) place += warp_counts[w];
    if (leaves && place < max_leaving) leaving_slots[group * max_leaving + place] = int32_t(dense_begin + e);
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = count;
      for (int w = 0; w < kBlock / 32; ++w) total += warp_counts[w];
      count = min(total, max_leaving);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) leaving_count[group] = count;
  for (int index = threadIdx.x; index < count * half; index += blockDim.x) {
    const int t = index / half, pair = index % half;
    const int64_t row = group * max_leaving + t, slot = leaving_slots[row];
    float a = bf16_value(layer.dense_keys[slot * hd + pair]), b = bf16_value(layer.dense_keys[slot * hd + pair + half]);
    if (!tables.keys_after_rope) {
      // Rotating by -position undoes RoPE; YaRN's magnitude factor is divided back out.
      float c, s;
      rope_factors(-layer.dense_positions[slot], tables.inv_freq[pair], 1.0f, c, s);
      const float x = a * c - b * s, y = b * c + a * s;
      a = tables.rope_attention_factor != 1.0f ? __fdiv_rn(x, tables.rope_attention_factor) : x;
      b = tables.rope_attention_factor != 1.0f ? __fdiv_rn(y, tables.rope_attention_factor) : y;
    }
    keys[row * hd + pair] = a;
    keys[row * hd + pair + half] = b;
    values[row * hd + pair] = bf16_value(layer.dense_values[slot * hd + pair]);
    values[row * hd + pair + half] = bf16_value(layer.dense_values[slot * hd + pair + half]);
  }
}

// Grid (step sequences, kv_heads).
__global__ void commit_leaving_kernel(CompressedLayer layer, StepRowsView step, int max_leaving,
                                      const int32_t* leaving_slots, const int32_t* leaving_count,
                                      const uint32_t* key_codes, const uint32_t* value_codes) {
  const int j = blockIdx.x, h = blockIdx.y;
  const int64_t head = head_slot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
  const int count = leaving_count[group], sk = layer.key_sparsity, sv = layer.value_sparsity;
  if (count == 0) return;
  const int64_t dense_base = layer.dense_begin[head];
  const int64_t coded_first = layer.coded_begin[head] + layer.coded_count[head];
  const int dense = layer.dense_count[head];
  for (int index = threadIdx.x; index < count * (sk + sv); index += blockDim.x) {
    const int t = index / (sk + sv), c = index % (sk + sv);
    const int64_t row = group * max_leaving + t, target = coded_first + t;
    if (c < sk)
      layer.key_codes[target * sk + c] = key_codes[row * sk + c];
    else
      layer.value_codes[target * sv + c - sk] = value_codes[row * sv + c - sk];
    if (c != 0) continue;
    const int64_t source = leaving_slots[row];
    layer.coded_positions[target] = layer.dense_positions[source];
    if (layer.coded_scores) layer.coded_scores[target] = layer.dense_scores[source];
    if (layer.coded_selected) layer.coded_selected[target] = layer.dense_selected[source];
  }
  __shared__ int removed[kMaxEvictionsPerStep], move_from[kMaxEvictionsPerStep], move_to[kMaxEvictionsPerStep];
  for (int t = threadIdx.x; t < count; t += blockDim.x)
    removed[t] = int(leaving_slots[group * max_leaving + t] - dense_base);
  __syncthreads();
  const int moves = compaction_moves(removed, count, dense, move_from, move_to);
  move_dense_slots(layer, move_from, move_to, moves, dense_base);
  if (threadIdx.x == 0) {
    layer.coded_count[head] += count;
    layer.dense_count[head] = dense - count;
  }
}

// The vectors a coding launch codes: the first counts[g] (all when counts is null) of each group of group_size.
struct CodingRows {
  int groups, group_size;
  const int32_t* counts;
  __host__ __device__ int64_t vectors() const { return int64_t(groups) * group_size; }
  __device__ bool coded(int64_t vector) const {
    if (vector >= vectors()) return false;
    return counts == nullptr || vector % group_size < counts[vector / group_size];
  }
};

struct QuantizeLaunch {
  QuantizeJob jobs[kMaxCodingJobs];
  int words[kMaxCodingJobs];  // per vector: QuantizedWords(dim, bits)
  int dim, kv_heads;
  CodingRows rows;
};
constexpr int kQuantizeWarps = kBlock / 32;

// Grid (vector blocks, jobs); a warp per vector. Every step rounds as cpu::quantize_vector does (IEEE division,
// no fused operations, fp16 rounded to nearest even), so the words come out identical.
__global__ void __launch_bounds__(kBlock) quantize_vectors_kernel(QuantizeLaunch p) {
  const QuantizeJob job = p.jobs[blockIdx.y];
  const int64_t vector = int64_t(blockIdx.x) * kQuantizeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, dim = p.dim;
  if (!p.rows.coded(vector)) return;  // the whole warp
  const float* x = job.x + vector * dim;
  const float* channel_scale =
      job.channel_scale != nullptr ? job.channel_scale + vector / p.rows.group_size % p.kv_heads * dim : nullptr;
  auto channel = [&](int d) { return channel_scale != nullptr ? __fdiv_rn(x[d], channel_scale[d]) : x[d]; };
  // The range's ends are the values of the first smallest and the last largest channel, as std::minmax_element
  // picks them: -0 and 0 compare equal but round to different fp16 bits.
  float low = FLT_MAX, high = -FLT_MAX;
  for (int d = lane; d < dim; d += 32) {
    low = fminf(low, channel(d));
    high = fmaxf(high, channel(d));
  }
  low = -warp_max(-low);
  high = warp_max(high);
  int first_low = dim, last_high = -1;
  for (int base = 0; base < dim; base += 32) {
    const int d = base + lane;
    const float y = d < dim ? channel(d) : 0.0f;
    const unsigned lows = __ballot_sync(0xffffffffu, d < dim && y == low);
    const unsigned highs = __ballot_sync(0xffffffffu, d < dim && y == high);
    if (lows != 0 && first_low == dim) first_low = base + __ffs(int(lows)) - 1;
    if (highs != 0) last_high = base + 31 - __clz(int(highs));
  }
  const float levels = float((1u << job.bits) - 1u);
  const uint16_t minimum_bits = saturated_fp16_bits(channel(first_low));
  const float minimum = fp16_value(minimum_bits);
  const uint16_t scale_bits = saturated_fp16_bits(__fdiv_rn(__fsub_rn(channel(last_high), minimum), levels));
  const float scale = fp16_value(scale_bits);
  uint32_t* words = job.words + vector * p.words[blockIdx.y];
  if (lane == 0) words[0] = uint32_t(scale_bits) | (uint32_t(minimum_bits) << 16);
  const int per_word = 32 / job.bits;
  for (int w = lane; w < dim / per_word; w += 32) {
    uint32_t word = 0;
    for (int k = 0; k < per_word; ++k) {
      const float level =
          scale > 0.0f
              ? fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(channel(w * per_word + k), minimum), scale)), 0.0f), levels)
              : 0.0f;
      word |= uint32_t(level) << (k * job.bits);
    }
    words[1 + w] = word;
  }
}

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
      int active = 0;
      if (cudaOccupancyMaxActiveClusters(&active, matching_pursuit_kernel<kVectors>, &config) != cudaSuccess ||
          active == 0)
        continue;
      launch.slice_in_shared = slice_in_shared;
      return cudaLaunchKernelEx(&config, matching_pursuit_kernel<kVectors>, launch);
    }
  return cudaErrorInvalidConfiguration;
}

// Grid (head slots).
__global__ void fill_compressed_noise_kernel(CompressedLayer layer, NoiseFill fill) {
  const int i = blockIdx.x, hd = layer.head_dim, sk = layer.key_sparsity, sv = layer.value_sparsity;
  const int32_t length = fill.lengths[i / layer.kv_heads], dense = fill.dense[i];
  const int coded = layer.coded_count ? fill.coded[i] : 0;
  const int selected = fill.selected ? fill.selected[i] : 0;
  if (threadIdx.x == 0) {
    layer.dense_count[i] = dense;
    if (layer.coded_count) layer.coded_count[i] = coded;
    if (layer.merged_tokens) layer.merged_tokens[i] = fill.merged[i] ? float(length - dense - coded) : 0.0f;
  }
  for (int64_t index = threadIdx.x; index < int64_t(dense) * hd; index += blockDim.x) {
    const int64_t slot = layer.dense_begin[i] + index / hd, element = slot * hd + index % hd;
    layer.dense_keys[element] = bf16_bits(2.0f * NoiseValue(NoiseBits(fill.seed, 2 * element)));
    layer.dense_values[element] = bf16_bits(NoiseValue(NoiseBits(fill.seed, 2 * element + 1)));
    if (index % hd != 0) continue;
    const int e = int(index / hd);
    layer.dense_positions[slot] = length - dense + e;
    if (layer.dense_scores) layer.dense_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 1, slot)) + 0.5f;
    if (layer.dense_selected) layer.dense_selected[slot] = e < selected;
  }
  for (int64_t index = threadIdx.x; index < int64_t(coded) * (sk + sv); index += blockDim.x) {
    const int64_t slot = layer.coded_begin[i] + index / (sk + sv);
    const int c = int(index % (sk + sv));
    const uint32_t bits = NoiseBits(fill.seed ^ 2, slot * (sk + sv) + c);
    const uint32_t code = PackCode(uint16_t(bits % uint32_t(fill.atoms)), saturated_fp16_bits(NoiseValue(bits)));
    if (c < sk)
      layer.key_codes[slot * sk + c] = code;
    else
      layer.value_codes[slot * sv + c - sk] = code;
    if (c != 0) continue;
    const int e = int(index / (sk + sv));
    layer.coded_positions[slot] = length - dense - coded + e;
    if (layer.coded_scores) layer.coded_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 3, slot)) + 0.5f;
    if (layer.coded_selected) layer.coded_selected[slot] = dense + e < selected;
  }
  if (layer.merged_tokens == nullptr) return;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    layer.merged_keys[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 4, int64_t(i) * hd + d));
    layer.merged_values[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 5, int64_t(i) * hd + d));
  }
}

}  // namespace

cudaError_t fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill, cudaStream_t stream) {
  if (layer.head_slots == 0) return cudaSuccess;
  fill_compressed_noise_kernel<<<layer.head_slots, kBlock, 0, stream>>>(layer, fill);
  return cudaGetLastError();
}

cudaError_t compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys_pre_rope,
                              const float* values, const float* inv_freq, float rope_attention_factor,
                              bool key_norm_scores, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  compressed_append_kernel<<<dim3(step.sequences, layer.kv_heads), 64, 0, stream>>>(
      layer, step, keys_pre_rope, values, inv_freq, rope_attention_factor, key_norm_scores);
  return cudaGetLastError();
}

bool compressed_attention_supported(int heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128 || head_dim == 256) && kv_heads > 0 && heads % kv_heads == 0 &&
         heads / kv_heads <= kMaxGroup;
}

size_t compressed_attention_workspace_bytes(const CompressedAttentionShape& shape, int rows, int kv_heads, int head_dim,
                                            int atoms) {
  // Whichever path the layer takes: the general kernel's r rows take r * splits partial states per query head; the
  // split path's launches hold at most kRowsPerTableLaunch rows when they carry atom tables and weights.
  const int group = shape.heads / kv_heads, sms = multiprocessors();
  size_t bytes = 0;
  for (int r = 1; r <= rows; ++r) {
    const int64_t general_slots = int64_t(r) * compressed_splits(r, kv_heads, shape.max_region) * shape.heads;
    bytes = std::max(bytes, size_t(general_slots) * (2 + head_dim) * sizeof(float));
    const int splits = split_path_splits(sms, r, kv_heads, group, shape.max_region);
    bytes = std::max(bytes, split_workspace(nullptr, r, shape.heads, kv_heads, head_dim, 0, splits).bytes);
    if (atoms > 0 && r <= kRowsPerTableLaunch)
      bytes = std::max(bytes, split_workspace(nullptr, r, shape.heads, kv_heads, head_dim, atoms, splits).bytes);
  }
  return bytes;
}

cudaError_t compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                                 const RefreshStateView* refresh, const CompressedAttentionShape& shape, const float* q,
                                 __nv_bfloat16* out, float* row_stats, void* workspace, cudaStream_t stream) {
  if (!compressed_attention_supported(shape.heads, layer.kv_heads, layer.head_dim)) return cudaErrorNotSupported;
  if (step.rows == 0) return cudaSuccess;
  AttentionLaunch launch{layer,
                         tables ? *tables : CodingTables{},
                         step,
                         refresh ? *refresh : RefreshStateView{},
                         refresh != nullptr,
                         shape,
                         q,
                         out,
                         row_stats,
                         {},
                         compressed_splits(step.rows, layer.kv_heads, shape.max_region)};
  const int group = shape.heads / layer.kv_heads;
  if (const SplitPathChoice choice = choose_split_path(layer, tables, group); choice.taken) {
    switch (layer.head_dim) {
      case 64: return launch_split_path_for_group<64>(launch, choice, workspace, stream);
      case 128: return launch_split_path_for_group<128>(launch, choice, workspace, stream);
      default: return launch_split_path_for_group<256>(launch, choice, workspace, stream);
    }
  }
  launch.partial = partial_view(workspace, step.rows, shape.heads, launch.splits);
  switch (layer.head_dim) {
    case 64: launch_compressed_attention<1>(launch, group, stream); break;
    case 128: launch_compressed_attention<2>(launch, group, stream); break;
    default: launch_compressed_attention<4>(launch, group, stream);
  }
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess || launch.splits == 1) return error;
  return combine_partials(launch.partial, step.rows, shape.heads, layer.head_dim, launch.splits, out, row_stats,
                          stream);
}

cudaError_t entry_probabilities(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                                const RefreshStateView* refresh, const CompressedAttentionShape& shape, const float* q,
                                const float* row_stats, bool full_steps_only, float* dense_probabilities,
                                float* coded_probabilities, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  const ProbabilityLaunch launch{layer,
                                 tables ? *tables : CodingTables{},
                                 step,
                                 refresh ? *refresh : RefreshStateView{},
                                 refresh != nullptr,
                                 full_steps_only,
                                 shape,
                                 q,
                                 row_stats,
                                 dense_probabilities,
                                 coded_probabilities};
  const dim3 grid((shape.max_region + kProbabilityEntriesPerBlock - 1) / kProbabilityEntriesPerBlock, layer.kv_heads,
                  step.sequences);
  switch (layer.head_dim) {
    case 64: entry_probabilities_kernel<1><<<grid, kWarps * 32, 0, stream>>>(launch); break;
    case 128: entry_probabilities_kernel<2><<<grid, kWarps * 32, 0, stream>>>(launch); break;
    default: entry_probabilities_kernel<4><<<grid, kWarps * 32, 0, stream>>>(launch);
  }
  return cudaGetLastError();
}

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

cudaError_t evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                  const StepTargets& targets, const EvictionSettings& settings, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  evict_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(layer, tables ? *tables : CodingTables{},
                                                                            step, targets, settings);
  return cudaGetLastError();
}

cudaError_t gather_leaving_entries(const CompressedLayer& layer, const CodingTables& tables, const StepRowsView& step,
                                   int coding_window, int max_leaving, float* keys, float* values,
                                   int32_t* leaving_slots, int32_t* leaving_count, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  gather_leaving_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(
      layer, tables, step, coding_window, max_leaving, keys, values, leaving_slots, leaving_count);
  return cudaGetLastError();
}

cudaError_t commit_leaving_entries(const CompressedLayer& layer, const StepRowsView& step, int max_leaving,
                                   const int32_t* leaving_slots, const int32_t* leaving_count,
                                   const uint32_t* key_codes, const uint32_t* value_codes, cudaStream_t stream) {
  if (step.sequences == 0) return cudaSuccess;
  commit_leaving_kernel<<<dim3(step.sequences, layer.kv_heads), kBlock, 0, stream>>>(
      layer, step, max_leaving, leaving_slots, leaving_count, key_codes, value_codes);
  return cudaGetLastError();
}

cudaError_t quantize_vectors(const QuantizeJob* jobs, int job_count, int dim, int kv_heads, int groups, int group_size,
                             const int32_t* counts, cudaStream_t stream) {
  QuantizeLaunch launch = {{}, {}, dim, kv_heads, {groups, group_size, counts}};
  if (launch.rows.vectors() == 0 || job_count == 0) return cudaSuccess;
  if (job_count > kMaxCodingJobs || kv_heads <= 0) return cudaErrorInvalidValue;
  for (int j = 0; j < job_count; ++j) {
    if (!IsQuantizationWidth(jobs[j].bits) || dim * jobs[j].bits % 32 != 0) return cudaErrorInvalidValue;
    launch.jobs[j] = jobs[j];
    launch.words[j] = QuantizedWords(dim, jobs[j].bits);
  }
  const dim3 grid(unsigned((launch.rows.vectors() + kQuantizeWarps - 1) / kQuantizeWarps), job_count);
  quantize_vectors_kernel<<<grid, kBlock, 0, stream>>>(launch);
  return cudaGetLastError();
}

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
