// The entry formats of a compressed layer as the attention kernels read them (attention.cu). Dense entries are bf16,
// the merged slot fp32, and coded entries one of: int8/4/2 quantized, dictionary codes of keys after RoPE, or
// dictionary codes of keys before RoPE (rotated to their position when read).
// - The general kernel and entry_probabilities read one entry per warp through EntryReader, which hands each region
//   of a head to the lane reader of its format.
// - The split kernel reads a split's dense share in bf16 tiles (DenseEntries) and its coded share through the reader
//   policy of the layer's coded format (NoCodedEntries, QuantizedEntries, CodedAfterRopeEntries), a template
//   argument of the kernel: each format's pass is its own code, so one can be made faster without touching another.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kernels/cuda/compressed/attention_schedule.h"
#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.h"
#include "kernels/cuda/vector_loads.cuh"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

using namespace compressed_launch;

// The attention kernels' parameters (all of attention.cu's kernels take one).
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
  // The split path only: its launches cover rows [first_row, first_row + grid rows) of the step, with the arrays of
  // SplitWorkspaceLayout (attention_schedule.h).
  int first_row;
  float* table;
  int table_stride;
  float* weights;
  float* combine_partials;
  int32_t* combined_blocks;
};

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

// --- One entry per warp: the general kernel and entry_probabilities ----------------------------------------------

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

// Quantized coded slot: both vectors dequantized, the key's channels scaled back by the head's channel scales.
template <int kPairs>
__device__ __forceinline__ void read_quantized_lane(const CompressedLayer& layer, const CodingTables& tables,
                                                   int64_t head, int64_t slot, int lane, LaneVector<kPairs>& key,
                                                   LaneVector<kPairs>& value) {
  constexpr int kHeadDim = 64 * kPairs;
  dequantize_lane<kPairs>(layer.key_codes + slot * layer.key_sparsity, tables.key_bits,
                          tables.key_channel_scale + int64_t(head % layer.kv_heads) * kHeadDim, lane, key);
  dequantize_lane<kPairs>(layer.value_codes + slot * layer.value_sparsity, tables.value_bits, nullptr, lane, value);
}

// A key coded before RoPE, rotated to its position. The angle is reduced to [0, 2 pi) in double (fp32 would be ~1e-3
// rad off at position 32K); the sine and cosine of the reduced angle are then cheap and exact enough in fp32.
template <int kPairs>
__device__ __forceinline__ void rotate_lane(const CodingTables& tables, int32_t position, int lane,
                                           LaneVector<kPairs>& key) {
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
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

// Dictionary-coded slot: key and value rebuilt from their atoms; a key coded before RoPE is then rotated.
template <int kPairs>
__device__ __forceinline__ void read_coded_lane(const CompressedLayer& layer, const CodingTables& tables, int64_t slot,
                                               int32_t position, int lane, LaneVector<kPairs>& key,
                                               LaneVector<kPairs>& value) {
  decode_lane<kPairs>(tables.key_atoms, layer.key_codes + slot * layer.key_sparsity, layer.key_sparsity, lane, key);
  if (!tables.keys_after_rope) rotate_lane<kPairs>(tables, position, lane, key);
  decode_lane<kPairs>(tables.value_atoms, layer.value_codes + slot * layer.value_sparsity, layer.value_sparsity, lane,
                      value);
}

template <int kPairs>
__device__ __forceinline__ void read_dense_lane(const CompressedLayer& layer, int64_t slot, int lane,
                                               LaneVector<kPairs>& key, LaneVector<kPairs>& value) {
  constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    key.low[i] = bf16_value(layer.dense_keys[slot * kHeadDim + lane + 32 * i]);
    key.high[i] = bf16_value(layer.dense_keys[slot * kHeadDim + kHalf + lane + 32 * i]);
    value.low[i] = bf16_value(layer.dense_values[slot * kHeadDim + lane + 32 * i]);
    value.high[i] = bf16_value(layer.dense_values[slot * kHeadDim + kHalf + lane + 32 * i]);
  }
}

template <int kPairs>
__device__ __forceinline__ void read_merged_lane(const CompressedLayer& layer, int64_t head, int lane,
                                                LaneVector<kPairs>& key, LaneVector<kPairs>& value) {
  constexpr int kHalf = kPairs * 32, kHeadDim = 2 * kHalf;
  const float* merged_key = layer.merged_keys + head * kHeadDim;
  const float* merged_value = layer.merged_values + head * kHeadDim;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    key.low[i] = merged_key[lane + 32 * i];
    key.high[i] = merged_key[kHalf + lane + 32 * i];
    value.low[i] = merged_value[lane + 32 * i];
    value.high[i] = merged_value[kHalf + lane + 32 * i];
  }
}

// The entries of a head as attention sees them, coded first, then dense, then the merged slot: key after RoPE,
// value, position, logit bias. Each region goes to the lane reader of its format.
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
    bias = 0.0f;
    if (e < coded && tables.key_bits > 0) {
      read_quantized_lane<kPairs>(layer, tables, head, layer.coded_begin[head] + e, lane, key, value);
    } else if (e < coded) {
      read_coded_lane<kPairs>(layer, tables, layer.coded_begin[head] + e, position, lane, key, value);
    } else if (e < coded + dense) {
      read_dense_lane<kPairs>(layer, layer.dense_begin[head] + e - coded, lane, key, value);
    } else {
      read_merged_lane<kPairs>(layer, head, lane, key, value);
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

// --- A split of (row, KV head) at a time: the split kernel --------------------------------------------------------

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

// Where one thread of the split kernel stands. Its warp's lanes form lane groups of kLanesPerEntry lanes, each group
// owning one entry at a time and each lane 8 of its dimensions from dim_base.
template <int kHeadDim>
struct SplitThread {
  static constexpr int kLanesPerEntry = kHeadDim / 8;
  static constexpr int kEntriesPerStep = 32 / kLanesPerEntry;
  int split, kv_head, launch_row, row, group;
  int32_t query_position;
  int64_t head;
  HeadCounts counts;
  SplitShare share;
  ViewFilter filter;
  int warp, lane, atoms, entry_slot, dim_base;
};

// The split's dense share, as the dense kernel reads its cache: kUnroll entries per lane group in flight, one 16-byte
// load each for K and V; out-of-share entries load as zeros and score -inf.
template <int kHeadDim, int kGroup, int kUnroll>
struct DenseEntries {
  static constexpr int kLanesPerEntry = SplitThread<kHeadDim>::kLanesPerEntry;
  static constexpr int kEntriesPerStep = SplitThread<kHeadDim>::kEntriesPerStep;
  static constexpr int kEntriesPerWarpTile = kEntriesPerStep * kUnroll;
  static constexpr int kBlockTileStride = kSplitWarps * kEntriesPerWarpTile;
  int64_t base;    // the head's first dense slot
  int warp_begin;  // the warp's first entry of the share

  // The warp's first tile heads for L2 (a reader whose pass comes first calls it).
  __device__ __forceinline__ void prefetch_first_tile(const AttentionLaunch& p, const SplitThread<kHeadDim>& t) const {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t slot = base + warp_begin + u * kEntriesPerStep + t.entry_slot;
      if (warp_begin + u * kEntriesPerStep + t.entry_slot >= t.share.dense_end) break;
      prefetch_to_l2(p.layer.dense_keys + slot * kHeadDim + t.dim_base);
      prefetch_to_l2(p.layer.dense_values + slot * kHeadDim + t.dim_base);
      prefetch_to_l2(p.layer.dense_positions + slot);
    }
  }

  __device__ __forceinline__ void attend(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                         const float (&query)[kGroup][8], float (&running_max)[kGroup],
                                         float (&running_sum)[kGroup], float (&acc)[kGroup][8]) const {
    const uint16_t* keys = p.layer.dense_keys + base * kHeadDim + t.dim_base;
    const uint16_t* values = p.layer.dense_values + base * kHeadDim + t.dim_base;
    auto load_tile = [&](const uint16_t* cache, int first_entry, uint4(&bits)[kUnroll]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int entry = first_entry + u * kEntriesPerStep + t.entry_slot;
        bits[u] = entry < t.share.dense_end
                      ? __ldg(reinterpret_cast<const uint4*>(cache + int64_t(entry) * kHeadDim))
                      : make_uint4(0, 0, 0, 0);
      }
    };
    // Keys run one tile ahead: the next tile's keys load while this tile's values are summed.
    uint4 key_bits[kUnroll];
    load_tile(keys, warp_begin, key_bits);
    for (int tile = warp_begin; tile < t.share.dense_end; tile += kBlockTileStride) {
      uint4 value_bits[kUnroll];
      load_tile(values, tile, value_bits);
      bool visible[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int entry = tile + u * kEntriesPerStep + t.entry_slot;
        const int32_t position = entry < t.share.dense_end ? p.layer.dense_positions[base + entry] : INT32_MAX;
        visible[u] =
            position <= t.query_position && t.filter.sees_slot(p.layer.dense_selected, base + entry, position);
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
  }
};

// The merged slot (fp32, seen by every row, with its logit bias) joins entry slot 0 of warp 0 on split 0.
template <int kHeadDim, int kGroup>
__device__ __forceinline__ void attend_merged_slot(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                                   const float (&query)[kGroup][8], float (&running_max)[kGroup],
                                                   float (&running_sum)[kGroup], float (&acc)[kGroup][8]) {
  if (t.split != 0 || !t.counts.merged || t.warp != 0) return;
  const float bias = p.shape.merge_compensation * logf(p.layer.merged_tokens[t.head]);
  float key[8], value[8];
  load_floats<8>(p.layer.merged_keys + t.head * kHeadDim + t.dim_base, key);
  load_floats<8>(p.layer.merged_values + t.head * kHeadDim + t.dim_base, value);
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const float dot = lane_group_dot<SplitThread<kHeadDim>::kLanesPerEntry>(query[g], key);
    if (t.entry_slot != 0) continue;
    const float logit = dot + bias, new_max = fmaxf(running_max[g], logit);
    const float correction = __expf(running_max[g] - new_max), weight = __expf(logit - new_max);
    running_max[g] = new_max;
    running_sum[g] = running_sum[g] * correction + weight;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * correction + weight * value[i];
  }
}

// --- The split kernel's coded-region readers ----------------------------------------------------------------------
//
// compressed_split_kernel<kHeadDim, kGroup, Reader> constructs its Reader(shared, layout) once per thread and calls:
//   attend_apart(p, t, dense)   first: entries that keep a softmax state of their own (and may prefetch the dense
//                               share meanwhile); the dense query and accumulators are not live yet
//   attend_with_dense(p, t, query, running_max, running_sum, acc)   then: entries merged into the dense state
//   publish(warp, lane)         beside the warps' dense states: the state apart, per warp
//   warp_coded_sum(w, g), reference(g), write_weights(p, slot, g, factor)   the state apart, merged into the split's
// kDenseUnroll sets the dense pass's entries in flight, and kUsesTable whether the reader reads the query-atom table:
// then the table kernel runs first, the split kernel follows it as a programmatic dependent, and the dynamic shared
// memory holds the table and the atom weights (split_shared_layout). NoCodedEntries is the layer without codes, and
// its no-ops are what the other readers inherit.

template <int kHeadDim, int kGroup>
struct NoCodedEntries {
  // As the dense kernel; fewer in flight beside a coded region, whose layers hold few dense entries.
  static constexpr int kDenseUnroll = kGroup <= 4 ? 4 : 2;
  static constexpr bool kUsesTable = false;

  __device__ NoCodedEntries(float*, const SplitSharedLayout&) {}
  // Shared-memory words each warp stages entries in (split_shared_layout).
  __device__ static int stage_words(const CompressedLayer&) { return 0; }
  template <typename Dense>
  __device__ __forceinline__ void attend_apart(const AttentionLaunch&, const SplitThread<kHeadDim>&, const Dense&) {}
  __device__ __forceinline__ void attend_with_dense(const AttentionLaunch&, const SplitThread<kHeadDim>&,
                                                    const float (&)[kGroup][8], float (&)[kGroup], float (&)[kGroup],
                                                    float (&)[kGroup][8]) {}
  __device__ __forceinline__ void publish(int, int) {}
  __device__ __forceinline__ float warp_coded_sum(int, int) const { return 0.0f; }
  __device__ __forceinline__ float reference(int) const { return -INFINITY; }
  __device__ __forceinline__ void write_weights(const AttentionLaunch&, int64_t, int, float) const {}
};

// A lane's 8 channels of a quantized vector: the vector's range word (scale and minimum, fp16) and the one or two
// words that hold the lane's levels (8 * bits bits from bit 8 * bits * lane of the level words; int8 spans two).
struct QuantizedLane {
  uint32_t range;
  uint2 levels;
};
__device__ __forceinline__ QuantizedLane staged_quantized_lane(const uint32_t* words, int bits, int dim_base,
                                                               bool present) {
  const uint32_t* first = words + 1 + dim_base * bits / 32;
  // An entry past the share reads whatever the stage holds: a range of 0 keeps it finite (its weight is 0).
  return {present ? words[0] : 0u, make_uint2(first[0], bits == 8 ? first[1] : 0u)};
}

// The lane's levels as the floats 2^23 + level: a level OR'd into the mantissa of 2^23 is that float exactly, so a
// subtraction finishes the conversion in full-rate instructions, where an integer-to-float conversion runs at a
// quarter of the rate.
constexpr float kLevelBias = 8388608.0f;  // 2^23
__device__ __forceinline__ void biased_levels(const QuantizedLane& lane, int bits, int first_bit, float (&out)[8]) {
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t word = lane.levels.x >> first_bit;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i == 4 && bits == 8) word = lane.levels.y;
    out[i] = __uint_as_float((word & mask) | 0x4B000000u);
    word >>= bits;
  }
}

// Sums kGroup values of every lane over its lane group of kLanes lanes and leaves each lane one of the totals: that
// of group (lane % kLanes) / (kLanes / kGroup). At each halving step a lane keeps half of its values and sends the
// other half, so the kGroup totals cost kGroup - 1 + log2(kLanes / kGroup) shuffles, not kGroup log2(kLanes).
template <int kLanes, int kGroup>
__device__ __forceinline__ float lane_group_scatter_sum(float (&values)[kGroup], int lane) {
  static_assert(kGroup <= kLanes, "a lane group holds at least one lane per query head");
#pragma unroll
  for (int count = kGroup, offset = kLanes / 2; count > 1; count /= 2, offset /= 2) {
    const bool upper = lane & offset;
#pragma unroll
    for (int j = 0; j < count / 2; ++j) {
      const float keep = upper ? values[j + count / 2] : values[j];
      const float send = upper ? values[j] : values[j + count / 2];
      values[j] = keep + __shfl_xor_sync(0xffffffff, send, offset);
    }
  }
  float total = values[0];
#pragma unroll
  for (int offset = kLanes / kGroup / 2; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffff, total, offset);
  return total;
}

// Quantized coded entries, read before the dense ones as those are. Each warp stages its chunks of entries (codes and
// positions) in shared memory with asynchronous 4-byte copies, the next chunk in flight while it reads the current
// one: the loads then do not wait on registers, so a warp keeps a chunk's worth of bytes in flight, where register
// tiles held only two entries per lane group at group 4. Within a chunk each lane group takes kUnroll entries per
// tile, which joins the dense pass's online softmax with one rescale per tile.
//
// The arithmetic is what bounds the pass once the bytes flow (a lane handles 8 channels of a 68-byte int4 vector
// where the dense pass handles 8 of a 256-byte one), so the entry's range is applied once per entry rather than once
// per channel: with key channel d = c_d (m + s l_d),
//   q . k = s * sum_d (q_d c_d) l_d + m * sum_d q_d c_d,
// the second sum fixed per query head, and a value's weighted sum p (m + s l_d) splits the same way into (p s) l_d,
// per channel, and p m, one per query head added to every channel at the end. Each lane's per-head partial dots are
// summed so that each lane ends with one head's logit (lane_group_scatter_sum), whose exponential it alone computes,
// then the weights are gathered back: 9 shuffles and one exponential per entry at group 4, not 16 and 4.
template <int kHeadDim, int kGroup>
struct QuantizedEntries : NoCodedEntries<kHeadDim, kGroup> {
  // Four in flight spilled at group 4 beside the quantized pass.
  static constexpr int kDenseUnroll = 2;
  // Entries per lane group and tile: four spilled at group 4, where two blocks per SM cap a thread at 128 registers.
  static constexpr int kUnroll = kGroup == 4 ? 2 : 4;
  static constexpr int kLanesPerEntry = SplitThread<kHeadDim>::kLanesPerEntry;
  static constexpr int kEntriesPerStep = SplitThread<kHeadDim>::kEntriesPerStep;
  static constexpr int kLanesPerHead = kLanesPerEntry / kGroup;  // lanes of a lane group left holding one head's sums
  static constexpr int kChunkEntries = quantized_chunk_entries(kHeadDim);
  static_assert(kChunkEntries % (kEntriesPerStep * kUnroll) == 0, "a chunk is whole tiles");

  uint32_t* stages;  // this warp's two chunks

  __device__ QuantizedEntries(float* shared, const SplitSharedLayout& layout)
      : NoCodedEntries<kHeadDim, kGroup>(shared, layout),
        stages(reinterpret_cast<uint32_t*>(shared + layout.stages) + (threadIdx.x / 32) * layout.stage_words) {}
  __device__ static int stage_words(const CompressedLayer& layer) {
    return quantized_stage_words(kHeadDim, layer.key_sparsity, layer.value_sparsity);
  }

  __device__ __forceinline__ void attend_with_dense(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                                    const float (&query)[kGroup][8], float (&running_max)[kGroup],
                                                    float (&running_sum)[kGroup], float (&acc)[kGroup][8]) {
    float key_scale[8];
    load_floats<8>(p.tables.key_channel_scale + int64_t(t.kv_head) * kHeadDim + t.dim_base, key_scale);
    float scaled_query_sum[kGroup];  // sum_d q_d c_d, then this lane's head's
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      scaled_query_sum[g] = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) scaled_query_sum[g] = fmaf(query[g][i], key_scale[i], scaled_query_sum[g]);
    }
    const float own_query_sum = lane_group_scatter_sum<kLanesPerEntry, kGroup>(scaled_query_sum, t.lane);
    float minimum_sum[kGroup];  // sum of p m over the entries, at the running max
#pragma unroll
    for (int g = 0; g < kGroup; ++g) minimum_sum[g] = 0.0f;

    constexpr int kChunkStride = kSplitWarps * kChunkEntries;
    const int first_chunk = t.share.coded_begin + t.warp * kChunkEntries;
    stage_chunk(p, t, first_chunk, 0);
    for (int chunk = first_chunk, stage = 0; chunk < t.share.coded_end; chunk += kChunkStride, stage ^= 1) {
      stage_chunk(p, t, chunk + kChunkStride, stage ^ 1);
      wait_for_older_copies();
      __syncwarp();
#pragma unroll 1
      for (int tile = 0; tile < kChunkEntries; tile += kEntriesPerStep * kUnroll)
        attend_tile(p, t, chunk, stage, tile, query, key_scale, own_query_sum, running_max, running_sum, minimum_sum,
                    acc);
      __syncwarp();  // every lane is done with this stage before a copy overwrites it
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] += minimum_sum[g];
  }

 private:
  __device__ __forceinline__ uint32_t* key_words(const AttentionLaunch& p, int stage) const {
    return stages + stage * quantized_chunk_words(kHeadDim, p.layer.key_sparsity, p.layer.value_sparsity);
  }
  __device__ __forceinline__ uint32_t* value_words(const AttentionLaunch& p, int stage) const {
    return key_words(p, stage) + kChunkEntries * p.layer.key_sparsity;
  }
  __device__ __forceinline__ int32_t* positions(const AttentionLaunch& p, int stage) const {
    return reinterpret_cast<int32_t*>(value_words(p, stage) + kChunkEntries * p.layer.value_sparsity);
  }

  // The codes and positions of the share's entries [first, first + kChunkEntries) into `stage`, as one group of
  // asynchronous copies (empty past the share, so that every iteration commits one).
  __device__ __forceinline__ void stage_chunk(const AttentionLaunch& p, const SplitThread<kHeadDim>& t, int first,
                                              int stage) const {
    const int entries = max(0, min(kChunkEntries, t.share.coded_end - first));
    const int64_t slot = p.layer.coded_begin[t.head] + first;
    const int key_sparsity = p.layer.key_sparsity, value_sparsity = p.layer.value_sparsity;
    uint32_t* keys = key_words(p, stage);
    uint32_t* values = value_words(p, stage);
    int32_t* staged_positions = positions(p, stage);
    for (int i = t.lane; i < entries * key_sparsity; i += 32)
      copy_async_4(keys + i, p.layer.key_codes + slot * key_sparsity + i);
    for (int i = t.lane; i < entries * value_sparsity; i += 32)
      copy_async_4(values + i, p.layer.value_codes + slot * value_sparsity + i);
    for (int i = t.lane; i < entries; i += 32) copy_async_4(staged_positions + i, p.layer.coded_positions + slot + i);
    commit_async_copies();
  }

  // kUnroll entries per lane group from entry `tile` of the staged chunk that starts at share entry `chunk`.
  __device__ __forceinline__ void attend_tile(const AttentionLaunch& p, const SplitThread<kHeadDim>& t, int chunk,
                                              int stage, int tile, const float (&query)[kGroup][8],
                                              const float (&key_scale)[8], float own_query_sum,
                                              float (&running_max)[kGroup], float (&running_sum)[kGroup],
                                              float (&minimum_sum)[kGroup], float (&acc)[kGroup][8]) const {
    const int key_bits = p.tables.key_bits, value_bits = p.tables.value_bits;
    const int key_sparsity = p.layer.key_sparsity, value_sparsity = p.layer.value_sparsity;
    const int key_first_bit = t.dim_base * key_bits % 32, value_first_bit = t.dim_base * value_bits % 32;
    const int own_head = (t.lane % kLanesPerEntry) / kLanesPerHead;
    const int group_lane = t.entry_slot * kLanesPerEntry;  // the lane group's first lane
    const int64_t chunk_slot = p.layer.coded_begin[t.head] + chunk;
    // Values are read from the stage only when they are added, so that they hold no registers during the logits.
    QuantizedLane keys[kUnroll];
    bool visible[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int local = tile + u * kEntriesPerStep + t.entry_slot;
      const bool present = chunk + local < t.share.coded_end;
      const int32_t position = positions(p, stage)[local];
      visible[u] = present && position <= t.query_position &&
                   t.filter.sees_slot(p.layer.coded_selected, chunk_slot + local, position);
      keys[u] = staged_quantized_lane(key_words(p, stage) + local * key_sparsity, key_bits, t.dim_base, visible[u]);
    }
    // This lane's head's logit of each entry, and their max.
    float logit[kUnroll], own_tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float level[8], partial[kGroup];
      biased_levels(keys[u], key_bits, key_first_bit, level);
#pragma unroll
      for (int i = 0; i < 8; ++i) level[i] = (level[i] - kLevelBias) * key_scale[i];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        partial[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) partial[g] = fmaf(query[g][i], level[i], partial[g]);
      }
      const float dot = lane_group_scatter_sum<kLanesPerEntry, kGroup>(partial, t.lane);
      const QuantizedRange range = quantized_range_of(keys[u].range);
      logit[u] = visible[u] ? fmaf(range.scale, dot, range.minimum * own_query_sum) : -INFINITY;
      own_tile_max = fmaxf(own_tile_max, logit[u]);
    }
    float own_max = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float tile_max = __shfl_sync(0xffffffff, own_tile_max, group_lane + g * kLanesPerHead);
      const float new_max = fmaxf(running_max[g], tile_max);
      const float correction = __expf(running_max[g] - new_max);
      running_max[g] = new_max;
      running_sum[g] *= correction;
      minimum_sum[g] *= correction;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= correction;
      if (g == own_head) own_max = new_max;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float own_weight = __expf(logit[u] - own_max);
      const int local = tile + u * kEntriesPerStep + t.entry_slot;
      const QuantizedLane value =
          staged_quantized_lane(value_words(p, stage) + local * value_sparsity, value_bits, t.dim_base, visible[u]);
      const QuantizedRange range = quantized_range_of(value.range);
      float level[8];
      biased_levels(value, value_bits, value_first_bit, level);
#pragma unroll
      for (int i = 0; i < 8; ++i) level[i] -= kLevelBias;
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float weight = __shfl_sync(0xffffffff, own_weight, group_lane + g * kLanesPerHead);
        running_sum[g] += weight;
        minimum_sum[g] = fmaf(weight, range.minimum, minimum_sum[g]);
        const float scaled_weight = weight * range.scale;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(scaled_weight, level[i], acc[g][i]);
      }
    }
  }
};

constexpr int kCodedEntriesPerThread = 2;  // coded entries each thread holds per tile of the coded pass
constexpr int kWeightBits = 30;            // the atom weights' fixed-point units stay under 2^kWeightBits
constexpr int kInitialWeightExponent = 100;

__device__ inline uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// Dictionary codes of keys after RoPE. A coded key's logit is sum_s c_s * T[atom_s], where T = (scale * q) .
// key_atoms comes from the table kernel (every head shares the dictionary) and is gathered from shared memory; a
// coded value is never rebuilt: the split adds its softmax weights per value atom (w_a += p * c_s) in shared memory,
// and the combine applies the value dictionary once per query head. Coded first, so that the dense pass's query and
// accumulator registers are not held across this pass (they made it spill at group 4).
//
// The pass goes in tiles of kSplitThreads * kCodedEntriesPerThread entries, one entry per thread at a time: logits
// from the table, then the block's running max (one barrier; the atom weights are rescaled in the rare tile that
// raises it, behind a second), then every visible entry adds p * c to the weights of its value atoms. kMaxCodes
// bounds the sparsities (multiples of 4: codes load 16 bytes at a time).
//
// The atom weights are fixed point, w = units * 2^-exponent, added with native integer atomics: a float atomic add
// on shared memory is a compare-and-swap loop that the hardware runs one lane at a time (about 17 us per tile of 512
// entries, measured). Each p <= 1 (relative to the running max), so the units' magnitudes stay under bound *
// 2^exponent, bound being the sum of |c| over the value codes added so far; the exponent keeps that under 2^30
// (resolution about 2^-30 of the bound, no overflow) and falls, with a rescale, as the bound grows.
template <int kHeadDim, int kGroup, int kMaxCodes>
struct CodedAfterRopeEntries : NoCodedEntries<kHeadDim, kGroup> {
  static constexpr int kDenseUnroll = 2;
  static constexpr bool kUsesTable = true;
  static constexpr int kCodeVectors = kMaxCodes / 4;

  // One tile's entries of this thread.
  struct Tile {
    uint4 key_codes[kCodedEntriesPerThread][kCodeVectors], value_codes[kCodedEntriesPerThread][kCodeVectors];
    int32_t position[kCodedEntriesPerThread];
    bool visible[kCodedEntriesPerThread];
    float logit[kCodedEntriesPerThread][kGroup];
  };

  float* table;        // [atoms][kGroup], the table of this (row, KV head)
  int32_t* weights;    // [kGroup][atoms], fixed point
  float* tile_stats;   // [2][kSplitWarps][kGroup + 1], by tile parity
  float* coded_sums;   // [kSplitWarps][kGroup]
  // `reference_max` is the block's running max of the coded logits, and `weight_exponent` the weights' scale (both
  // the same in every thread): the atom weights and each thread's coded_sum are relative to the reference.
  float reference_max[kGroup], coded_sum[kGroup];
  int weight_exponent = kInitialWeightExponent;

  __device__ CodedAfterRopeEntries(float* shared, const SplitSharedLayout& layout)
      : NoCodedEntries<kHeadDim, kGroup>(shared, layout),
        table(shared),
        weights(reinterpret_cast<int32_t*>(shared + layout.weights)),
        tile_stats(shared + layout.tile_stats),
        coded_sums(shared + layout.coded_sums) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      reference_max[g] = -INFINITY;
      coded_sum[g] = 0.0f;
    }
  }

  // The dense share's first tile heads for L2 during this pass (the query rows are there: the table kernel read
  // them), and the table kernel may still be running until the first tile of codes has loaded.
  template <typename Dense>
  __device__ __forceinline__ void attend_apart(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                               const Dense& dense) {
    for (int i = threadIdx.x; i < kGroup * t.atoms; i += kSplitThreads) weights[i] = 0;
    dense.prefetch_first_tile(p, t);
    const int64_t coded_base = p.layer.coded_begin[t.head];
    float coefficient_bound = 0.0f;
    int parity = 0;
    for (int first = t.share.coded_begin; first < t.share.coded_end;
         first += kSplitThreads * kCodedEntriesPerThread, parity ^= 1) {
      Tile tile;
      load_tile(p, t, coded_base, first, tile);
      if (first == t.share.coded_begin) stage_table(p, t);
      const float coefficient_sum = tile_logits(p, tile);
      raise_reference(t, parity, tile, coefficient_sum, coefficient_bound);
      add_weights(p, t, tile);
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float warp_total = warp_sum(coded_sum[g]);
      coded_sum[g] = warp_total;
    }
    // A split without coded entries still waits for the table kernel, so that this kernel's completion (which the
    // combine waits for) implies that kernel's: the combine's counters are cleared there.
    if (t.share.coded_begin == t.share.coded_end) wait_for_prerequisite();
    __syncthreads();  // every gather from the table is done before the states overwrite it
  }

  __device__ __forceinline__ void publish(int warp, int lane) {
    if (lane == 0)
#pragma unroll
      for (int g = 0; g < kGroup; ++g) coded_sums[warp * kGroup + g] = coded_sum[g];
  }
  __device__ __forceinline__ float warp_coded_sum(int w, int g) const { return coded_sums[w * kGroup + g]; }
  __device__ __forceinline__ float reference(int g) const { return reference_max[g]; }
  __device__ __forceinline__ void write_weights(const AttentionLaunch& p, int64_t slot, int g, float factor) const {
    const float scale = ldexpf(factor, -weight_exponent);
    for (int a = threadIdx.x; a < p.tables.atoms; a += kSplitThreads)
      p.weights[slot * p.tables.atoms + a] = float(weights[g * p.tables.atoms + a]) * scale;
  }

 private:
  __device__ __forceinline__ void load_tile(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                            int64_t coded_base, int first, Tile& tile) const {
    const int key_sparsity = p.layer.key_sparsity, value_sparsity = p.layer.value_sparsity;
#pragma unroll
    for (int k = 0; k < kCodedEntriesPerThread; ++k) {
      const int entry = first + k * kSplitThreads + threadIdx.x;
      const bool valid = entry < t.share.coded_end;
      const int64_t slot = coded_base + entry;
#pragma unroll
      for (int c = 0; c < kCodeVectors; ++c) {
        tile.key_codes[k][c] = valid && 4 * c < key_sparsity
                                   ? __ldg(reinterpret_cast<const uint4*>(p.layer.key_codes + slot * key_sparsity) + c)
                                   : make_uint4(0, 0, 0, 0);
        tile.value_codes[k][c] =
            valid && 4 * c < value_sparsity
                ? __ldg(reinterpret_cast<const uint4*>(p.layer.value_codes + slot * value_sparsity) + c)
                : make_uint4(0, 0, 0, 0);
      }
      tile.position[k] = valid ? p.layer.coded_positions[slot] : INT32_MAX;
      tile.visible[k] =
          tile.position[k] <= t.query_position && t.filter.sees_slot(p.layer.coded_selected, slot, tile.position[k]);
    }
  }

  // Once the first tile's codes are in flight: the table kernel is done, and its row for the group is copied in.
  __device__ __forceinline__ void stage_table(const AttentionLaunch& p, const SplitThread<kHeadDim>& t) {
    wait_for_prerequisite();
    const float* source = p.table + (int64_t(t.launch_row) * p.layer.kv_heads + t.kv_head) * p.table_stride;
    for (int i = threadIdx.x * 4; i < kGroup * t.atoms; i += kSplitThreads * 4) copy_async_16(table + i, source + i);
    wait_async_copies();
    __syncthreads();
  }

  // The tile's logits (-inf where not visible) and the sum of |c| over its visible value codes.
  __device__ __forceinline__ float tile_logits(const AttentionLaunch& p, Tile& tile) const {
    const int key_sparsity = p.layer.key_sparsity, value_sparsity = p.layer.value_sparsity;
    float coefficient_sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kCodedEntriesPerThread; ++k) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) tile.logit[k][g] = 0.0f;
#pragma unroll
      for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (4 * c + i >= key_sparsity) break;
          const uint32_t code = word(tile.key_codes[k][c], i);
          float row[kGroup];
          load_floats<kGroup>(table + code_atom(code) * kGroup, row);
          const float coefficient = code_coefficient(code);
#pragma unroll
          for (int g = 0; g < kGroup; ++g) tile.logit[k][g] += coefficient * row[g];
        }
      }
#pragma unroll
      for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (4 * c + i < value_sparsity && tile.visible[k])
            coefficient_sum += fabsf(code_coefficient(word(tile.value_codes[k][c], i)));
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) tile.logit[k][g] = tile.visible[k] ? tile.logit[k][g] : -INFINITY;
    }
    return coefficient_sum;
  }

  // The tile's max and coefficient sum over the block raise the reference and the bound; the weights are rescaled
  // when the reference rose or the exponent must fall.
  __device__ __forceinline__ void raise_reference(const SplitThread<kHeadDim>& t, int parity, const Tile& tile,
                                                  float coefficient_sum, float& coefficient_bound) {
    float* stats = tile_stats + (parity * kSplitWarps + t.warp) * (kGroup + 1);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float thread_max = tile.logit[0][g];
#pragma unroll
      for (int k = 1; k < kCodedEntriesPerThread; ++k) thread_max = fmaxf(thread_max, tile.logit[k][g]);
      thread_max = warp_max(thread_max);
      if (t.lane == 0) stats[g] = thread_max;
    }
    coefficient_sum = warp_sum(coefficient_sum);
    if (t.lane == 0) stats[kGroup] = coefficient_sum;
    __syncthreads();
    float factor[kGroup];
    bool rescale = false;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float tile_max = -INFINITY;
      for (int w = 0; w < kSplitWarps; ++w)
        tile_max = fmaxf(tile_max, tile_stats[(parity * kSplitWarps + w) * (kGroup + 1) + g]);
      const float new_reference = fmaxf(reference_max[g], tile_max);
      factor[g] = new_reference > reference_max[g] ? __expf(reference_max[g] - new_reference) : 1.0f;
      rescale |= new_reference > reference_max[g] && reference_max[g] > -INFINITY;
      reference_max[g] = new_reference;
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
        for (int a = threadIdx.x; a < t.atoms; a += kSplitThreads)
          weights[g * t.atoms + a] = __float2int_rn(float(weights[g * t.atoms + a]) * scale);
      }
      __syncthreads();
    }
    weight_exponent = exponent;
  }

  // Every visible entry of the tile adds its probability times each value code's coefficient to that atom's weight.
  __device__ __forceinline__ void add_weights(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                              const Tile& tile) {
    const int value_sparsity = p.layer.value_sparsity;
    const float unit = ldexpf(1.0f, weight_exponent);
#pragma unroll
    for (int k = 0; k < kCodedEntriesPerThread; ++k) {
      if (!tile.visible[k]) continue;
      float probability[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        probability[g] = __expf(tile.logit[k][g] - reference_max[g]);
        coded_sum[g] += probability[g];
      }
#pragma unroll
      for (int c = 0; c < kCodeVectors; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (4 * c + i >= value_sparsity) break;
          const uint32_t code = word(tile.value_codes[k][c], i);
          const float units = code_coefficient(code) * unit;
#pragma unroll
          for (int g = 0; g < kGroup; ++g)
            if (g < t.group) atomicAdd(&weights[g * t.atoms + code_atom(code)], __float2int_rn(probability[g] * units));
        }
      }
    }
  }
};

}  // namespace
}  // namespace kvplan::cuda
