// Coding what leaves the window (the oracle: cpu/compressed/coding.cc): gather_leaving_entries takes the dense
// entries past a sequence's coding window (keys back before RoPE where the codes are), quantize_vectors or
// matching_pursuit (pursuit.cu) codes them, and commit_leaving_entries moves them into the coded region.
#include <cfloat>
#include <cstdint>

#include "base/number_formats.h"
#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

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

}  // namespace

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

}  // namespace kvplan::cuda
