// compressed_attention and entry_probabilities (the oracle of both: cpu/compressed/attention.cc). Two ways through
// the attention, as the plan (attention_schedule.h) says:
// - the general kernel: split-KV over every row, a warp per entry rebuilding it in every lane through EntryReader;
// - the split path: the query-atom table (layers coded after RoPE only), the split kernel, and the combine, each
//   after the first a programmatic dependent of the one before. The split kernel reads the dense share in bf16
//   tiles (as the dense kernel reads its cache) and the coded share through the reader policy of the layer's format
//   (entry_readers.cuh). Their grids depend only on the rows, kv_heads and max_region; each block reads its head's
//   counts from device memory. bench/coded_attention_tuning.md has the measurements behind the choices.
#include <cfloat>
#include <cstdint>

#include "kernels/cuda/compressed/attention_schedule.h"
#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/compressed/entry_readers.cuh"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"
#include "kernels/cuda/vector_loads.cuh"
#include "kernels/cuda/warp_reduce.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kWarps = 4;      // warps of the general kernel and of entry_probabilities
constexpr int kTableDims = 128;  // dimensions staged per step of the table kernel: head_dim 128 in one

// --- The general kernel ------------------------------------------------------------------------------------------

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

// --- The split path ------------------------------------------------------------------------------------------------

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

// The split's state per query head, into the launch's partial states: the dense part (merged over warps) and the
// part the coded reader kept apart, brought to one max. Every thread derives the factors it needs; the first `group`
// threads publish max and sum.
template <int kHeadDim, int kGroup, typename CodedReader, typename States>
__device__ __forceinline__ void write_split_state(const AttentionLaunch& p, const SplitThread<kHeadDim>& t,
                                                  const States& states, const CodedReader& coded) {
  const int heads = p.shape.heads;
  float dense_factor[kGroup], coded_factor[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    float dense_max = -FLT_MAX, dense_sum = 0.0f, coded_total = 0.0f;
    for (int w = 0; w < kSplitWarps; ++w) dense_max = fmaxf(dense_max, states.max[w][g]);
    for (int w = 0; w < kSplitWarps; ++w) {
      if (states.sum[w][g] > 0.0f) dense_sum += states.sum[w][g] * __expf(states.max[w][g] - dense_max);
      coded_total += coded.warp_coded_sum(w, g);
    }
    float split_max = dense_sum > 0.0f ? dense_max : -FLT_MAX;
    if (coded_total > 0.0f) split_max = fmaxf(split_max, coded.reference(g));
    dense_factor[g] = dense_sum > 0.0f ? __expf(dense_max - split_max) : 0.0f;
    coded_factor[g] = coded_total > 0.0f ? __expf(coded.reference(g) - split_max) : 0.0f;
    if (threadIdx.x == g && g < t.group) {
      const int64_t slot = (int64_t(t.launch_row) * heads + t.kv_head * t.group + g) * p.splits + t.split;
      p.partial.max[slot] = split_max;
      p.partial.sum[slot] = dense_sum * dense_factor[g] + coded_total * coded_factor[g];
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (g >= t.group) break;
    const int64_t slot = (int64_t(t.launch_row) * heads + t.kv_head * t.group + g) * p.splits + t.split;
    for (int d = threadIdx.x; d < kHeadDim; d += kSplitThreads)
      p.partial.acc[slot * kHeadDim + d] = states.merge(g, d).acc * dense_factor[g];
    coded.write_weights(p, slot, g, coded_factor[g]);
  }
}

// Grid (splits, kv_heads, rows of the launch), kSplitThreads threads. One split of one (row, KV head): the coded
// reader's entries kept apart (codes after RoPE), then the dense share with the coded entries the reader merges into
// it (quantized) and, on split 0, the merged slot, into one partial softmax state per query head of the group (max,
// sum, unnormalised dense output and, with codes after RoPE, the weight of every value atom, all relative to that
// max).
template <int kHeadDim, int kGroup, typename CodedReader>
__global__ void __launch_bounds__(kSplitThreads, split_blocks_per_sm(kGroup))
    compressed_split_kernel(AttentionLaunch p) {
  using Thread = SplitThread<kHeadDim>;
  using Dense = DenseEntries<kHeadDim, kGroup, CodedReader::kDenseUnroll>;
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
  const int entry_slot = lane / Thread::kLanesPerEntry, dim_base = (lane % Thread::kLanesPerEntry) * 8;
  const int64_t dense_base = p.layer.dense_begin[head];
  const int warp_begin = share.dense_begin + warp * Dense::kEntriesPerWarpTile;
  const Thread t{split, kv_head, launch_row, row,  group,      query_position, head,
                 counts, share,  filter,     warp, lane, atoms, entry_slot,     dim_base};
  const Dense dense{dense_base, warp_begin};
  CodedReader coded(shared, split_shared_layout(kHeadDim, kGroup, t.atoms, CodedReader::kUsesTable,
                                                CodedReader::stage_words(p.layer)));
  coded.attend_apart(p, t, dense);

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
  coded.attend_with_dense(p, t, query, running_max, running_sum, acc);
  dense.attend(p, t, query, running_max, running_sum, acc);
  attend_merged_slot<kHeadDim, kGroup>(p, t, query, running_max, running_sum, acc);
  // Merge the entry slots of the warp.
  merge_entry_slots<Thread::kLanesPerEntry>(running_max, running_sum, acc);

  States& states = *reinterpret_cast<States*>(shared);
  if (lane < Thread::kLanesPerEntry) states.publish_lane_group(warp, lane, t.dim_base, running_max, running_sum, acc);
  coded.publish(warp, lane);
  __syncthreads();
  write_split_state<kHeadDim, kGroup>(p, t, states, coded);
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

// The split kernel follows the table kernel as a programmatic dependent when its reader reads the table; otherwise the
// kernel before it is the caller's, whose results its first reads need, so it launches plainly.
template <int kHeadDim, int kGroup, typename CodedReader>
cudaError_t launch_split_kernel(const AttentionLaunch& launch, int rows, size_t shared_bytes, cudaStream_t stream) {
  const auto kernel = compressed_split_kernel<kHeadDim, kGroup, CodedReader>;
  if (shared_bytes > 48 * 1024) {
    if (const cudaError_t error =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes));
        error != cudaSuccess)
      return error;
  }
  const dim3 grid(launch.splits, launch.layer.kv_heads, rows);
  if (CodedReader::kUsesTable) return launch_dependent(kernel, grid, dim3(kSplitThreads), shared_bytes, stream, launch);
  kernel<<<grid, kSplitThreads, shared_bytes, stream>>>(launch);
  return cudaGetLastError();
}

// One launch chain of the plan: `planned` rows from first_row, with their arrays where the plan laid them out.
template <int kHeadDim, int kGroup>
cudaError_t launch_split_chain(AttentionLaunch launch, const CompressedAttentionPlan& plan,
                               const SplitLaunchPlan& planned, int first_row, void* workspace, cudaStream_t stream) {
  const int kv_heads = launch.layer.kv_heads, group = plan.group, rows = planned.rows;
  const int atom_chunks = (plan.atoms + kCombineAtoms - 1) / kCombineAtoms;
  const SplitWorkspaceLayout& carved = planned.workspace;
  char* base = static_cast<char*>(workspace);
  launch.first_row = first_row;
  launch.splits = planned.splits;
  launch.partial = partial_view(base + carved.partial, rows, launch.shape.heads, launch.splits);
  launch.table_stride = carved.table_stride;
  if (plan.atoms > 0) {
    launch.table = reinterpret_cast<float*>(base + carved.table);
    launch.weights = reinterpret_cast<float*>(base + carved.weights);
    launch.combine_partials = reinterpret_cast<float*>(base + carved.combine_partials);
    launch.combined_blocks = reinterpret_cast<int32_t*>(base + carved.combined_blocks);
    const int vectors = rows * kv_heads * group_width(group);
    query_atom_table_kernel<<<dim3((plan.atoms + kTableTile - 1) / kTableTile, (vectors + kTableTile - 1) / kTableTile),
                              kSplitThreads, 0, stream>>>(launch, rows);
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  cudaError_t error = cudaSuccess;
  switch (plan.path) {
    case AttentionPath::kSplitQuantized:
      error = launch_split_kernel<kHeadDim, kGroup, QuantizedEntries<kHeadDim, kGroup>>(launch, rows, plan.shared_bytes,
                                                                                        stream);
      break;
    case AttentionPath::kSplitCodedAfterRope:
      error = plan.max_codes == 8 ? launch_split_kernel<kHeadDim, kGroup, CodedAfterRopeEntries<kHeadDim, kGroup, 8>>(
                                        launch, rows, plan.shared_bytes, stream)
                                  : launch_split_kernel<kHeadDim, kGroup, CodedAfterRopeEntries<kHeadDim, kGroup, 16>>(
                                        launch, rows, plan.shared_bytes, stream);
      break;
    default:
      error = launch_split_kernel<kHeadDim, kGroup, NoCodedEntries<kHeadDim, kGroup>>(launch, rows, plan.shared_bytes,
                                                                                      stream);
  }
  if (error != cudaSuccess) return error;
  const dim3 combine_grid(atom_chunks + group, kv_heads, rows);
  return launch_dependent(compressed_combine_kernel<kHeadDim, kGroup>, combine_grid, dim3(kSplitThreads), 0, stream,
                          launch);
}

template <int kHeadDim, int kGroup>
cudaError_t launch_split_path(const AttentionLaunch& launch, const CompressedAttentionPlan& plan, void* workspace,
                              cudaStream_t stream) {
  int first_row = 0;
  for (int i = 0; i < plan.full_launches; ++i, first_row += plan.full.rows)
    if (const cudaError_t error =
            launch_split_chain<kHeadDim, kGroup>(launch, plan, plan.full, first_row, workspace, stream);
        error != cudaSuccess)
      return error;
  if (plan.rest.rows == 0) return cudaSuccess;
  return launch_split_chain<kHeadDim, kGroup>(launch, plan, plan.rest, first_row, workspace, stream);
}

template <int kHeadDim>
cudaError_t launch_split_path_for_group(const AttentionLaunch& launch, const CompressedAttentionPlan& plan,
                                        void* workspace, cudaStream_t stream) {
  switch (group_width(plan.group)) {
    case 1: return launch_split_path<kHeadDim, 1>(launch, plan, workspace, stream);
    case 2: return launch_split_path<kHeadDim, 2>(launch, plan, workspace, stream);
    case 4: return launch_split_path<kHeadDim, 4>(launch, plan, workspace, stream);
    default: return launch_split_path<kHeadDim, kMaxGroup>(launch, plan, workspace, stream);
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

}  // namespace

cudaError_t compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                                 const RefreshStateView* refresh, const CompressedAttentionShape& shape,
                                 const CompressedAttentionPlan& plan, const float* q, __nv_bfloat16* out,
                                 float* row_stats, void* workspace, cudaStream_t stream) {
  if (!compressed_attention_supported(shape.heads, layer.kv_heads, layer.head_dim)) return cudaErrorNotSupported;
  if (step.rows == 0) return cudaSuccess;
  if (plan.rows != step.rows) return cudaErrorInvalidValue;
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
                         plan.general_splits};
  if (plan.path != AttentionPath::kGeneral) {
    switch (layer.head_dim) {
      case 64: return launch_split_path_for_group<64>(launch, plan, workspace, stream);
      case 128: return launch_split_path_for_group<128>(launch, plan, workspace, stream);
      default: return launch_split_path_for_group<256>(launch, plan, workspace, stream);
    }
  }
  launch.partial = partial_view(workspace, step.rows, shape.heads, launch.splits);
  switch (layer.head_dim) {
    case 64: launch_compressed_attention<1>(launch, plan.group, stream); break;
    case 128: launch_compressed_attention<2>(launch, plan.group, stream); break;
    default: launch_compressed_attention<4>(launch, plan.group, stream);
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

}  // namespace kvplan::cuda
