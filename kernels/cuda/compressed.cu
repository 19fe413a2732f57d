// The compressed layer cache's operations on the device (kernels/compressed_layout.h), each the counterpart of
// the kernels/cpu_reference.h function of the same name. Per-head work (append, eviction, coding, selection)
// runs one block per (step sequence, KV head); attention is split-KV over every row. Entry counts live in device
// memory and are read by the blocks themselves, so no launch depends on a length the host would have to read.
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"

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

// cos and sin of position * inv_freq as cpu::apply_rope forms them (double angle), scaled by the YaRN factor.
__device__ inline void rope_factors(int32_t position, float inv_freq, float attention_factor, float& c, float& s) {
  double sin_angle, cos_angle;
  sincos(double(position) * inv_freq, &sin_angle, &cos_angle);
  c = float(cos_angle) * attention_factor;
  s = float(sin_angle) * attention_factor;
}

__device__ inline float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Floats as unsigned keys that order like the floats.
__device__ inline uint32_t ordered_bits(float value) {
  const uint32_t bits = __float_as_uint(value);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

// The k-th largest (1 <= k <= valid keys) of the keys key_of(e, &key) reports valid for e in [0, n), by radix
// selection one byte at a time from the top. Keys must be unique, so exactly k keys are >= the result. Every
// thread of the block calls it and gets the result.
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
    if (e < coded) {
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
      float mean_key[2] = {merged_key[pair], merged_key[pair + half]};
      float mean_value[2] = {merged_value[pair], merged_value[pair + half]};
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
  __shared__ int count;
  // Slot order is the order both backends code in; the dense region is small (window + one step's rows).
  if (threadIdx.x == 0) {
    count = 0;
    for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot)
      if (layer.dense_positions[slot] < leaves_before && count < max_leaving)
        leaving_slots[group * max_leaving + count++] = int32_t(slot);
    leaving_count[group] = count;
  }
  __syncthreads();
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

// One block per vector: correlations with every atom, block argmax (lowest index on ties, as the CPU oracle's
// strict comparison), fp16 rounding, residual update. Grid (group_size, groups).
__global__ void matching_pursuit_kernel(const float* dictionary, int atoms, int dim, const float* x, int group_size,
                                        const int32_t* counts, int sparsity, uint32_t* codes) {
  extern __shared__ float residual[];
  __shared__ float best_value[32];
  __shared__ int best_index[32];
  if (counts != nullptr && int(blockIdx.x) >= counts[blockIdx.y]) return;
  const int64_t vector = int64_t(blockIdx.y) * group_size + blockIdx.x;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) residual[d] = x[vector * dim + d];
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
      const uint16_t rounded = saturated_fp16_bits(best_value[0]);
      codes[vector * sparsity + s] = PackCode(uint16_t(best_index[0]), rounded);
      best_value[0] = __half2float(__ushort_as_half(rounded));
    }
    __syncthreads();
    const float* atom = dictionary + int64_t(best_index[0]) * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) residual[d] -= best_value[0] * atom[d];
    __syncthreads();
  }
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

size_t compressed_attention_workspace_bytes(const CompressedAttentionShape& shape, int rows, int kv_heads,
                                            int head_dim) {
  int64_t slots = 0;  // r rows take r * splits partial states per query head
  for (int r = 1; r <= rows; ++r)
    slots = std::max<int64_t>(slots, int64_t(r) * compressed_splits(r, kv_heads, shape.max_region));
  return size_t(slots) * shape.heads * (2 + head_dim) * sizeof(float);
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
  launch.partial = partial_view(workspace, step.rows, shape.heads, launch.splits);
  const int group = shape.heads / layer.kv_heads;
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

cudaError_t matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int groups, int group_size,
                             const int32_t* counts, int sparsity, uint32_t* codes, cudaStream_t stream) {
  if (groups == 0 || group_size == 0) return cudaSuccess;
  matching_pursuit_kernel<<<dim3(group_size, groups), 256, dim * sizeof(float), stream>>>(
      dictionary, atoms, dim, x, group_size, counts, sparsity, codes);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
