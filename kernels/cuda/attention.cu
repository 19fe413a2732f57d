// Dense decode attention over the bf16 cache: split-KV (flash-decoding) with GQA, shaped for CUDA graphs. The
// grid depends only on (rows, kv_heads, max_context); every block reads its row's position from device memory
// and derives its own share of the cache from it, so one captured launch stays right as the context grows.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/softmax_merge.cuh"
#include "kernels/cuda/split_kv.cuh"
#include "kernels/cuda/vector_loads.cuh"

namespace kvplan::cuda {
namespace {

constexpr int kVector = 8;  // bf16 elements per 16-byte load
constexpr int kMaxGroup = 8;
constexpr int kCombineWarps = 8;
// The fewest cache entries per split: below this a block's fixed costs (query load, merges, partial write and
// its share of the combine) outweigh the parallelism it adds.
constexpr int kDenseMinChunk = kMinChunk;

// Everything a launch reads; passed by value to keep the dispatch tables short.
struct AttentionParams {
  const float* q;
  const int32_t* row_sequence;
  const int32_t* row_position;
  int heads, kv_heads, capacity;
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  float scale;
  int sliding_window;
  int splits;  // the grid's width, fixed by (rows, kv_heads, max_context)
  __nv_bfloat16* out;
};

// The cache entries [begin, end) that one split of a row reads, and how many of the grid's splits the row uses.
// The split kernel and the combine both derive it from the row's position, so they agree without the host
// knowing any length. Every used split gets at least one entry.
struct SplitRange {
  int begin, end, used_splits;
};

__device__ inline SplitRange split_range(int position, int sliding_window, int splits, int split) {
  const int first = sliding_window > 0 ? max(0, position - sliding_window + 1) : 0;
  const int length = position + 1 - first;
  const int wanted = min(splits, (length + kDenseMinChunk - 1) / kDenseMinChunk);
  const int chunk = (length + wanted - 1) / wanted;
  const int begin = first + split * chunk;
  return {begin, min(begin + chunk, position + 1), (length + chunk - 1) / chunk};
}

// Grid (splits, kv_heads, rows). A group of kHeadDim/8 lanes owns one cache entry at a time (one 16-byte load
// each for K and V), and every query head of the GQA group reuses it, so the cache is read once. A warp issues
// the loads of kUnroll entries per lane group before using any, which keeps enough bytes in flight to reach HBM
// bandwidth, and rescales its running softmax state once per such tile rather than once per entry. A row that
// uses a single split gets its output written here; otherwise the block leaves a partial state for the combine.
template <int kHeadDim, int kGroup, int kWarps, int kUnroll, int kMinBlocksPerSm>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocksPerSm)
    attention_split_kernel(const AttentionParams p, const PartialView partial) {
  constexpr int kLanesPerEntry = kHeadDim / kVector;
  constexpr int kEntriesPerStep = 32 / kLanesPerEntry;
  constexpr int kEntriesPerWarpTile = kEntriesPerStep * kUnroll;
  constexpr int kBlockTileStride = kWarps * kEntriesPerWarpTile;
  const int split = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
  const SplitRange range = split_range(p.row_position[row], p.sliding_window, p.splits, split);
  if (split >= range.used_splits) return;

  const int group = p.heads / p.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int entry_slot = lane / kLanesPerEntry, dim_base = (lane % kLanesPerEntry) * kVector;
  float query[kGroup][kVector], acc[kGroup][kVector], running_max[kGroup], running_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    running_max[g] = -FLT_MAX;
    running_sum[g] = 0.0f;
    const float4* source =
        reinterpret_cast<const float4*>(p.q + (int64_t(row) * p.heads + kv_head * group + g) * kHeadDim + dim_base);
    const float4 low = g < group ? source[0] : float4{}, high = g < group ? source[1] : float4{};
    const float loaded[kVector] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      acc[g][i] = 0.0f;
      query[g][i] = loaded[i] * p.scale;
    }
  }

  const int64_t head_offset = (int64_t(p.row_sequence[row]) * p.kv_heads + kv_head) * p.capacity * kHeadDim + dim_base;
  const __nv_bfloat16* keys = p.k_cache + head_offset;
  const __nv_bfloat16* values = p.v_cache + head_offset;
  // A warp's tile is kUnroll steps of kEntriesPerStep entries; out-of-range entries load as zeros, whose
  // weight is 0, and 0 * 0 keeps the accumulators finite.
  auto load_tile = [&](const __nv_bfloat16* cache, int first_entry, uint4(&bits)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int entry = first_entry + u * kEntriesPerStep + entry_slot;
      bits[u] = entry < range.end ? __ldg(reinterpret_cast<const uint4*>(cache + int64_t(entry) * kHeadDim))
                                  : make_uint4(0, 0, 0, 0);
    }
  };
  // Keys run one tile ahead: the next tile's keys load while this tile's values are summed.
  const int warp_begin = range.begin + warp * kEntriesPerWarpTile;
  uint4 key_bits[kUnroll];
  load_tile(keys, warp_begin, key_bits);
  for (int tile = warp_begin; tile < range.end; tile += kBlockTileStride) {
    uint4 value_bits[kUnroll];
    load_tile(values, tile, value_bits);
    float score[kUnroll][kGroup];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float key[kVector];
      unpack_bf16x8(key_bits[u], key);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float dot = lane_group_dot<kLanesPerEntry>(query[g], key);
        score[u][g] = tile + u * kEntriesPerStep + entry_slot < range.end ? dot : -INFINITY;
      }
    }
    load_tile(keys, tile + kBlockTileStride, key_bits);
    rescale_to_tile(score, running_max, running_sum, acc);
    add_tile_values(score, value_bits, running_max, running_sum, acc);
  }

  // Merge the entry slots of the warp, then the warps of the block.
  merge_entry_slots<kLanesPerEntry>(running_max, running_sum, acc);
  __shared__ __align__(16) WarpSoftmaxStates<kWarps, kGroup, kHeadDim> states;  // float4 stores below
  if (lane < kLanesPerEntry) states.publish_lane_group(warp, lane, dim_base, running_max, running_sum, acc);
  __syncthreads();
  for (int index = threadIdx.x; index < group * kHeadDim; index += blockDim.x) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    const SoftmaxState merged = states.merge(g, d);
    const int64_t head_row = int64_t(row) * p.heads + kv_head * group + g;
    if (range.used_splits == 1) {
      p.out[head_row * kHeadDim + d] = __float2bfloat16(merged.acc / merged.sum);
      continue;
    }
    const int64_t slot = head_row * p.splits + split;
    partial.acc[slot * kHeadDim + d] = merged.acc;
    if (d == 0) {
      partial.max[slot] = merged.max;
      partial.sum[slot] = merged.sum;
    }
  }
}

// Grid (heads, rows). The warps share out a row's used splits (a few each at decode sizes), each lane owning
// kHeadDim/32 dimensions, then merge through shared memory.
template <int kHeadDim>
__global__ void __launch_bounds__(kCombineWarps * 32)
    attention_combine_kernel(const AttentionParams p, const PartialView partial) {
  constexpr int kDimsPerLane = kHeadDim / 32;
  const int head = blockIdx.x, row = blockIdx.y;
  const int used_splits = split_range(p.row_position[row], p.sliding_window, p.splits, 0).used_splits;
  if (used_splits == 1) return;  // the split kernel wrote this row's output

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t base = (int64_t(row) * p.heads + head) * p.splits;
  float running_max[1] = {-FLT_MAX}, running_sum[1] = {0.0f}, acc[kDimsPerLane] = {};
  for (int s = warp; s < used_splits; s += kCombineWarps) {
    const float split_max = partial.max[base + s], split_sum = partial.sum[base + s];
    float split_acc[kDimsPerLane];
    load_floats<kDimsPerLane>(partial.acc + (base + s) * kHeadDim + lane * kDimsPerLane, split_acc);
    const float new_max = fmaxf(running_max[0], split_max);
    const float mine = __expf(running_max[0] - new_max), theirs = __expf(split_max - new_max);
    running_sum[0] = running_sum[0] * mine + split_sum * theirs;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] = acc[i] * mine + split_acc[i] * theirs;
    running_max[0] = new_max;
  }
  __shared__ WarpSoftmaxStates<kCombineWarps, 1, kHeadDim> states;
  states.publish(warp, lane, running_max, running_sum);
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) states.acc[warp][0][lane * kDimsPerLane + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    const SoftmaxState merged = states.merge(0, d);
    p.out[(int64_t(row) * p.heads + head) * kHeadDim + d] = __float2bfloat16(merged.acc / merged.sum);
  }
}

// Eight warps keep enough loads in flight per block; at head_dim 256 the block's shared merge area would pass
// the 48 KB static limit, so it takes four. Four entries per lane group per tile, two where the GQA group's
// query and accumulator registers are twice as many. Registers are capped so that 16 warps fit on an SM
// (8 for a group of 8, whose 16 query and accumulator registers per head would otherwise spill).
template <int kHeadDim>
constexpr int kSplitWarps = kHeadDim <= 128 ? 8 : 4;
template <int kGroup>
constexpr int kSplitUnroll = kGroup <= 4 ? 4 : 2;
template <int kHeadDim, int kGroup>
constexpr int kSplitMinBlocksPerSm = (kGroup <= 4 ? 16 : 8) / kSplitWarps<kHeadDim>;

// Splits per (row, KV head): as many as fill one wave of the GPU (resident blocks on every SM at once), no more
// than max_context allows. One wave, because a second one would run a few blocks on an otherwise idle GPU.
int dense_split_count(int rows, int kv_heads, int max_context, int wave_blocks) {
  const int pairs = rows * kv_heads;
  const int wanted = wave_blocks / pairs > 1 ? wave_blocks / pairs : 1;
  const int most = (max_context + kDenseMinChunk - 1) / kDenseMinChunk;
  return wanted < most ? wanted : (most > 1 ? most : 1);
}

// Resident blocks per SM of a kernel: a property of the kernel and the architecture, so asked once per kernel.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0) != cudaSuccess) return 1;
  return blocks > 0 ? blocks : 1;
}

template <int kHeadDim, int kGroup>
cudaError_t launch_attention(AttentionParams params, int rows, int max_context, void* workspace, cudaStream_t stream) {
  const auto kernel = attention_split_kernel<kHeadDim, kGroup, kSplitWarps<kHeadDim>, kSplitUnroll<kGroup>,
                                             kSplitMinBlocksPerSm<kHeadDim, kGroup>>;
  constexpr int kThreads = kSplitWarps<kHeadDim> * 32;
  static const int resident_blocks = blocks_per_sm(kernel, kThreads);
  int device = 0, sms = 0;
  if (const cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) return error;
  if (const cudaError_t error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      error != cudaSuccess)
    return error;
  params.splits = dense_split_count(rows, params.kv_heads, max_context, sms * resident_blocks);
  const PartialView partial = partial_view(workspace, rows, params.heads, params.splits);
  kernel<<<dim3(params.splits, params.kv_heads, rows), kThreads, 0, stream>>>(params, partial);
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  if (params.splits == 1) return cudaSuccess;  // every row was written by its single split
  attention_combine_kernel<kHeadDim><<<dim3(params.heads, rows), kCombineWarps * 32, 0, stream>>>(params, partial);
  return cudaGetLastError();
}

template <int kHeadDim>
cudaError_t launch_for_group(const AttentionParams& params, int rows, int max_context, void* workspace,
                             cudaStream_t stream) {
  const int group = params.heads / params.kv_heads;
  if (group == 1) return launch_attention<kHeadDim, 1>(params, rows, max_context, workspace, stream);
  if (group == 2) return launch_attention<kHeadDim, 2>(params, rows, max_context, workspace, stream);
  if (group <= 4) return launch_attention<kHeadDim, 4>(params, rows, max_context, workspace, stream);
  return launch_attention<kHeadDim, kMaxGroup>(params, rows, max_context, workspace, stream);
}

}  // namespace

bool attention_supported(int heads, int kv_heads, int head_dim) {
  const bool head_dim_ok = head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return head_dim_ok && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup;
}

size_t attention_workspace_bytes(int rows, int heads, int kv_heads, int head_dim, int max_context) {
  // A launch of r rows takes r * dense_split_count(r, ...) partial states per query head; a wave never holds more
  // than 32 blocks per SM (Hopper's limit), which bounds the split count without knowing the kernel.
  constexpr int kMaxBlocksPerSm = 32;
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int64_t slots = 0;
  for (int r = 1; r <= rows; ++r)
    slots = std::max<int64_t>(slots, int64_t(r) * dense_split_count(r, kv_heads, max_context, sms * kMaxBlocksPerSm));
  return size_t(slots) * heads * (2 + head_dim) * sizeof(float);
}

cudaError_t attention(const float* q, const int32_t* row_sequence, const int32_t* row_position, int rows, int heads,
                      int kv_heads, int head_dim, int capacity, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, float scale, int sliding_window, int max_context, void* workspace,
                      __nv_bfloat16* out, cudaStream_t stream) {
  if (!attention_supported(heads, kv_heads, head_dim)) return cudaErrorNotSupported;
  if (rows == 0) return cudaSuccess;
  const AttentionParams params{q,       row_sequence, row_position, heads,          kv_heads, capacity,
                               k_cache, v_cache,      scale,        sliding_window, 0,        out};
  switch (head_dim) {
    case 32: return launch_for_group<32>(params, rows, max_context, workspace, stream);
    case 64: return launch_for_group<64>(params, rows, max_context, workspace, stream);
    case 128: return launch_for_group<128>(params, rows, max_context, workspace, stream);
    default: return launch_for_group<256>(params, rows, max_context, workspace, stream);
  }
}

}  // namespace kvplan::cuda
