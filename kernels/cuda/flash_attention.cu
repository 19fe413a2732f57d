// Prefill attention over the bf16 cache on tensor cores (flash attention, FlashAttention-2's loop): a block takes a
// tile of up to kFlashRows consecutive rows of one sequence for one query head, its warps 16 rows each. Key and value
// tiles of kKeys entries stream into shared memory (cp.async, two stages, rows XOR-swizzled so that ldmatrix reads
// are free of bank conflicts); S = Q K^T and O += P V run as bf16 m16n8k16 MMAs with fp32 accumulation, and the
// online softmax stays in the accumulator registers. Tiles past the tile's last position are never read, so a
// causal prompt does half the work of a full one.
#include <cfloat>
#include <climits>

#include "kernels/cuda/async_copy.cuh"
#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {
namespace {

constexpr int kFlashWarps = kFlashRows / 16;
constexpr int kFlashThreads = kFlashWarps * 32;
constexpr int kKeys = 64;  // entries per key/value tile
constexpr float kLog2e = 1.4426950408889634f;

struct FlashParams {
  const float* q;
  const int32_t* row_sequence;
  const int32_t* row_position;
  const int32_t* tiles;
  int tile_count, heads, kv_heads, capacity;
  const uint16_t* k_cache;
  const uint16_t* v_cache;
  float scale_log2;  // the softmax scale times log2(e): the weights are exp2 of scaled logits
  int sliding_window;
  __nv_bfloat16* out;
};

__device__ __forceinline__ uint32_t bf16_pair(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// D += A B for one m16n8k16 tile: A row-major 16x16, B column-major 16x8, bf16 in, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices, lane l giving the address of row l % 8 of matrix l / 8; lane l receives elements
// (l / 4, 2 (l % 4) and + 1) of each, or with the transpose (2 (l % 4) and + 1, l / 4).
__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ __forceinline__ void load_matrices_transposed(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// Element offset of 16-byte chunk `chunk` of tile row `row`: chunks are XOR-swizzled by row % 8, so the eight rows
// an ldmatrix reads at one logical chunk sit in eight different bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) * 8);
}

template <int kHeadDim>
struct FlashTile {
  static constexpr int kChunks = kHeadDim / 8;                 // 16-byte chunks of a cache row
  static constexpr int kDimSteps = kHeadDim / 16;              // MMA k-steps of Q K^T
  static constexpr int kDimTiles = kHeadDim / 8;               // n-tiles of O
  static constexpr int kStageElements = 2 * kKeys * kHeadDim;  // keys, then values
  static constexpr size_t kSharedBytes = 2 * kStageElements * sizeof(uint16_t);
};

// S = Q K^T over kKeys / 8 n-tiles of the staged keys; lane l's ldmatrix row is key 8 j + l % 8 at chunk
// 4 s + l / 8, which hands it the B fragments of k-steps 2 s and 2 s + 1.
template <int kHeadDim>
__device__ __forceinline__ void tile_scores(const uint16_t* key_tile,
                                            const uint32_t (&query)[FlashTile<kHeadDim>::kDimSteps][4], int lane,
                                            float (&score)[kKeys / 8][4]) {
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
    score[j][0] = score[j][1] = score[j][2] = score[j][3] = 0.0f;
#pragma unroll
    for (int s = 0; s < FlashTile<kHeadDim>::kDimSteps / 2; ++s) {
      uint32_t b[4];
      load_matrices(b, key_tile + swizzled<kHeadDim>(8 * j + lane % 8, 4 * s + lane / 8));
      mma_bf16(score[j], query[2 * s], b[0], b[1]);
      mma_bf16(score[j], query[2 * s + 1], b[2], b[3]);
    }
  }
}

// Masks a tile's scores where `masked` (element e of an n-tile: the thread's row e / 2, key 2 quad_lane + e % 2; a
// tile every row sees whole skips it), raises each row's running max (in units of scaled logits: scale_log2 > 0,
// so the max of raw scores scales to the max of scaled ones), rescales its sum and accumulators, and leaves the
// weights exp2(s * scale_log2 - max), one fused multiply-add each, in bf16 as the A fragments of P V: n-tiles 2 k
// and 2 k + 1 of S are k-step k's columns 0-7 and 8-15.
template <int kHeadDim>
__device__ __forceinline__ void online_softmax(const FlashParams& p, int first_key, bool masked, int quad_lane,
                                               const int32_t (&position)[2], float (&score)[kKeys / 8][4],
                                               float (&running_max)[2], float (&running_sum)[2],
                                               float (&acc)[FlashTile<kHeadDim>::kDimTiles][4],
                                               uint32_t (&weights)[kKeys / 16][4]) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (masked) {
        const int key = first_key + 8 * j + 2 * quad_lane + e % 2, distance = position[e / 2] - key;
        const bool seen = distance >= 0 && (p.sliding_window <= 0 || distance < p.sliding_window);
        score[j][e] = seen ? score[j][e] : -INFINITY;
      }
      tile_max[e / 2] = fmaxf(tile_max[e / 2], score[j][e]);
    }
  float reference[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
    const float new_max = fmaxf(running_max[i], tile_max[i] * p.scale_log2);
    reference[i] = new_max == -INFINITY ? 0.0f : new_max;  // a row that has seen nothing keeps weights of 0
    const float correction = exp2f(running_max[i] - reference[i]);
    running_max[i] = new_max;
    running_sum[i] *= correction;
#pragma unroll
    for (int n = 0; n < FlashTile<kHeadDim>::kDimTiles; ++n) {
      acc[n][2 * i] *= correction;
      acc[n][2 * i + 1] *= correction;
    }
  }
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
    float w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[e] = exp2f(fmaf(score[j][e], p.scale_log2, -reference[e / 2]));
      running_sum[e / 2] += w[e];
    }
    weights[j / 2][2 * (j % 2)] = bf16_pair(w[0], w[1]);
    weights[j / 2][2 * (j % 2) + 1] = bf16_pair(w[2], w[3]);
  }
}

// O += P V over the staged values; lane l's transposed ldmatrix row is key 16 k + l % 8 + 8 ((l / 8) % 2) at chunk
// 2 n + l / 16, which hands it the B fragments of output n-tiles 2 n and 2 n + 1.
template <int kHeadDim>
__device__ __forceinline__ void add_values(const uint16_t* value_tile, const uint32_t (&weights)[kKeys / 16][4],
                                           int lane, float (&acc)[FlashTile<kHeadDim>::kDimTiles][4]) {
#pragma unroll
  for (int k = 0; k < kKeys / 16; ++k)
#pragma unroll
    for (int n = 0; n < FlashTile<kHeadDim>::kDimTiles / 2; ++n) {
      uint32_t b[4];
      load_matrices_transposed(
          b, value_tile + swizzled<kHeadDim>(16 * k + lane % 8 + 8 * ((lane / 8) % 2), 2 * n + lane / 16));
      mma_bf16(acc[2 * n], weights[k], b[0], b[1]);
      mma_bf16(acc[2 * n + 1], weights[k], b[2], b[3]);
    }
}

// Grid (tiles, heads), kFlashThreads threads; the last tiles (the longest key ranges) start first.
template <int kHeadDim>
__global__ void __launch_bounds__(kFlashThreads) flash_attention_kernel(FlashParams p) {
  using Tile = FlashTile<kHeadDim>;
  extern __shared__ __align__(128) uint16_t stages[];
  __shared__ int32_t bounds[2];  // the tile's least and largest position
  const int tile = p.tile_count - 1 - blockIdx.x, head = blockIdx.y;
  const int first_row = p.tiles[2 * tile], end_row = p.tiles[2 * tile + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group_id = lane / 4, quad_lane = lane % 4;
  const int sequence = p.row_sequence[first_row], kv_head = head / (p.heads / p.kv_heads);

  if (threadIdx.x == 0) bounds[0] = INT_MAX, bounds[1] = -1;
  __syncthreads();
  if (first_row + int(threadIdx.x) < end_row) {
    const int32_t position = p.row_position[first_row + threadIdx.x];
    atomicMin(&bounds[0], position);
    atomicMax(&bounds[1], position);
  }
  __syncthreads();
  const int key_end = bounds[1] + 1;
  const int key_begin = p.sliding_window > 0 ? max(0, bounds[0] - p.sliding_window + 1) : 0;

  // This thread's two rows (group_id and group_id + 8 of the warp's 16) and their query fragments, rounded to bf16.
  int row[2];
  int32_t position[2];
  bool valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = first_row + 16 * warp + group_id + 8 * i;
    valid[i] = row[i] < end_row;
    position[i] = valid[i] ? p.row_position[row[i]] : -1;
  }
  uint32_t query[Tile::kDimSteps][4];
#pragma unroll
  for (int step = 0; step < Tile::kDimSteps; ++step)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int dim = 16 * step + 8 * half + 2 * quad_lane;
        const float2 pair =
            valid[i] ? *reinterpret_cast<const float2*>(p.q + (int64_t(row[i]) * p.heads + head) * kHeadDim + dim)
                     : make_float2(0.0f, 0.0f);
        query[step][2 * half + i] = bf16_pair(pair.x, pair.y);
      }

  const int64_t head_base = (int64_t(sequence) * p.kv_heads + kv_head) * p.capacity * kHeadDim;
  const uint16_t* keys = p.k_cache + head_base;
  const uint16_t* values = p.v_cache + head_base;
  auto load_tile = [&](int stage, int first_key) {
    uint16_t* key_tile = stages + stage * Tile::kStageElements;
    uint16_t* value_tile = key_tile + kKeys * kHeadDim;
    for (int c = threadIdx.x; c < kKeys * Tile::kChunks; c += kFlashThreads) {
      const int r = c / Tile::kChunks, chunk = c % Tile::kChunks, key = first_key + r;
      // Entries past the tile's last position may never have been written: zeros, so that no NaN reaches P V.
      const bool present = key < key_end;
      const int64_t offset = int64_t(present ? key : key_begin) * kHeadDim + chunk * 8;
      copy_async_16_or_zero(key_tile + swizzled<kHeadDim>(r, chunk), keys + offset, present);
      copy_async_16_or_zero(value_tile + swizzled<kHeadDim>(r, chunk), values + offset, present);
    }
    commit_async_copies();
  };

  float acc[Tile::kDimTiles][4];
#pragma unroll
  for (int n = 0; n < Tile::kDimTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float running_max[2] = {-INFINITY, -INFINITY}, running_sum[2] = {0.0f, 0.0f};

  load_tile(0, key_begin);
  for (int first_key = key_begin, stage = 0; first_key < key_end; first_key += kKeys, stage ^= 1) {
    wait_async_copies();
    __syncthreads();  // the tile is in, and every warp is done with the other stage
    if (first_key + kKeys < key_end) load_tile(stage ^ 1, first_key + kKeys);
    const uint16_t* key_tile = stages + stage * Tile::kStageElements;
    const uint16_t* value_tile = key_tile + kKeys * kHeadDim;

    float score[kKeys / 8][4];
    tile_scores<kHeadDim>(key_tile, query, lane, score);
    uint32_t weights[kKeys / 16][4];
    // Every row sees the whole tile when it ends at or before the least position and, with a window, starts within
    // the window of the largest one.
    const bool masked =
        first_key + kKeys - 1 > bounds[0] || (p.sliding_window > 0 && first_key < bounds[1] - p.sliding_window + 1);
    online_softmax<kHeadDim>(p, first_key, masked, quad_lane, position, score, running_max, running_sum, acc, weights);
    add_values<kHeadDim>(value_tile, weights, lane, acc);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = running_sum[i];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    if (!valid[i]) continue;
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    __nv_bfloat16* out = p.out + (int64_t(row[i]) * p.heads + head) * kHeadDim + 2 * quad_lane;
#pragma unroll
    for (int n = 0; n < Tile::kDimTiles; ++n)
      *reinterpret_cast<__nv_bfloat162*>(out + 8 * n) =
          __floats2bfloat162_rn(acc[n][2 * i] * inverse, acc[n][2 * i + 1] * inverse);
  }
}

template <int kHeadDim>
cudaError_t launch_flash(const FlashParams& params, cudaStream_t stream) {
  const auto kernel = flash_attention_kernel<kHeadDim>;
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(FlashTile<kHeadDim>::kSharedBytes));
  if (configured != cudaSuccess) return configured;
  kernel<<<dim3(params.tile_count, params.heads), kFlashThreads, FlashTile<kHeadDim>::kSharedBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

bool flash_attention_supported(int heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && kv_heads > 0 && heads % kv_heads == 0;
}

cudaError_t flash_attention(const float* q, const int32_t* row_sequence, const int32_t* row_position,
                            const int32_t* tiles, int tile_count, int heads, int kv_heads, int head_dim, int capacity,
                            const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache, float scale, int sliding_window,
                            __nv_bfloat16* out, cudaStream_t stream) {
  if (!flash_attention_supported(heads, kv_heads, head_dim)) return cudaErrorNotSupported;
  if (tile_count == 0) return cudaSuccess;
  const FlashParams params{q,
                           row_sequence,
                           row_position,
                           tiles,
                           tile_count,
                           heads,
                           kv_heads,
                           capacity,
                           reinterpret_cast<const uint16_t*>(k_cache),
                           reinterpret_cast<const uint16_t*>(v_cache),
                           scale * kLog2e,
                           sliding_window,
                           out};
  return head_dim == 64 ? launch_flash<64>(params, stream) : launch_flash<128>(params, stream);
}

}  // namespace kvplan::cuda
