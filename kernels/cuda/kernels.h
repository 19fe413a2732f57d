// CUDA kernels of the GPU runtime. Raw pointers in, cudaError_t out: no framework, abseil or protobuf types,
// so this header and its .cu files build with nvcc alone. Each kernel file's CPU oracle sits at the same name under
// kernels/cpu/ (elementwise.cu: kernels/cpu/elementwise.h, attention.cu: kernels/cpu/attention.h, ...).
//
// Layouts (row-major):
//   activations          [rows, dim]                          rows = tokens of one step across the batch
//   q / k / v            [rows, heads, head_dim]
//   KV cache per layer   [sequences, kv_heads, capacity, head_dim] bf16; entry j holds position j
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/compressed_layout.h"
#include "kernels/cuda/compressed/attention_schedule.h"

namespace kvplan::cuda {

// Whether a CUDA device can be used now: callers fall back to the CPU runtime and GPU tests skip without one.
bool device_available();

// out[r, :] = float(table[tokens[r], :]).
cudaError_t embed_tokens(const __nv_bfloat16* table, const int32_t* tokens, int rows, int dim, float* out,
                         cudaStream_t stream);

// out = bf16(x / rms(x) * weight), one row per block.
cudaError_t rms_norm(const float* x, const __nv_bfloat16* weight, int rows, int dim, float eps, __nv_bfloat16* out,
                     cudaStream_t stream);

// Rotate-half RoPE in place; x: [rows, heads, head_dim], positions: [rows], inv_freq: [head_dim / 2].
cudaError_t apply_rope(float* x, const int32_t* positions, const float* inv_freq, int rows, int heads, int head_dim,
                       float attention_factor, cudaStream_t stream);

// cpu::fill_noise_bf16: deterministic noise for benchmarks.
cudaError_t fill_noise_bf16(__nv_bfloat16* out, int64_t n, uint32_t seed, cudaStream_t stream);

// x[r, :] += bias, for the q/k/v biases of Qwen2-style attention.
cudaError_t add_row_bias(float* x, const float* bias, int rows, int dim, cudaStream_t stream);

// out = bf16(silu(gate) * up) for gate and up stacked in each row ([rows, 2 ffn]); out: [rows, ffn].
cudaError_t swiglu(const float* gate_up, int64_t rows, int ffn, __nv_bfloat16* out, cudaStream_t stream);

// Writes k, v ([rows, kv_heads, head_dim]) of row r to entry row_position[r] of sequence row_sequence[r].
cudaError_t append_kv(const float* k, const float* v, const int32_t* row_sequence, const int32_t* row_position,
                      int rows, int kv_heads, int head_dim, int capacity, __nv_bfloat16* k_cache,
                      __nv_bfloat16* v_cache, cudaStream_t stream);

// Causal GQA attention over the full cache: row r attends to entries 0..row_position[r] (the last
// sliding_window of them when sliding_window > 0) of sequence row_sequence[r]. Split-KV (flash-decoding):
// partial softmax per chunk of the cache, then a combine pass, so one decode row still fills the GPU.
// max_context is only an upper bound on every row_position[r] + 1 (the cache capacity will do): it and rows
// fix the launch, and each block sizes its work from its row's position as the device holds it when the block
// runs, so one launch captured into a CUDA graph replays correctly as the context grows. A bound far above
// the real lengths costs a few idle blocks, not time in proportion.
// head_dim must be 32, 64, 128 or 256 and heads / kv_heads at most 8 (attention_supported says).
// workspace: attention_workspace_bytes(rows, heads, kv_heads, head_dim, max_context) bytes, for calls with at most
// that many rows and that bound; its contents need no initialising.
bool attention_supported(int heads, int kv_heads, int head_dim);
size_t attention_workspace_bytes(int rows, int heads, int kv_heads, int head_dim, int max_context);
cudaError_t attention(const float* q, const int32_t* row_sequence, const int32_t* row_position, int rows, int heads,
                      int kv_heads, int head_dim, int capacity, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, float scale, int sliding_window, int max_context, void* workspace,
                      __nv_bfloat16* out, cudaStream_t stream);

// Prefill attention on tensor cores (flash_attention.cu): the same causal GQA attention over the full cache as
// attention(), for passes whose rows come in tiles of consecutive rows of one sequence: tile i is rows
// [tiles[2 i], tiles[2 i + 1]) of the pass (device memory, at most kFlashRows rows each; flash_tiles makes them).
// The query and the softmax weights enter bf16 MMAs with fp32 accumulation, so the oracle is cpu::flash_attention
// (cpu::attention of the query rounded to bf16), and the weights' rounding moves an output by at most 2^-9 of the
// largest |value| the row sees. head_dim 64 or 128 (flash_attention_supported).
inline constexpr int kFlashRows = 64;
bool flash_attention_supported(int heads, int kv_heads, int head_dim);
cudaError_t flash_attention(const float* q, const int32_t* row_sequence, const int32_t* row_position,
                            const int32_t* tiles, int tile_count, int heads, int kv_heads, int head_dim, int capacity,
                            const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache, float scale,
                            int sliding_window, __nv_bfloat16* out, cudaStream_t stream);
// The tiles of a pass whose sequence g holds rows [row_begin[g], row_begin[g + 1]), into `tiles` (room for
// 2 * flash_tile_bound(rows, groups) values); returns their count. Host code: the plan half of plan/run.
inline int flash_tile_bound(int rows, int groups) { return rows / kFlashRows + groups; }
inline int flash_tiles(const int32_t* row_begin, int groups, int32_t* tiles) {
  int count = 0;
  for (int g = 0; g < groups; ++g)
    for (int first = row_begin[g]; first < row_begin[g + 1]; first += kFlashRows, ++count) {
      tiles[2 * count] = first;
      tiles[2 * count + 1] = first + kFlashRows < row_begin[g + 1] ? first + kFlashRows : row_begin[g + 1];
    }
  return count;
}

}  // namespace kvplan::cuda

// --- Compressed layer caches (kernels/compressed_layout.h) ---------------------------------------------------
// In kernels/cuda/compressed/, one file per operation family; each kernel's oracle is the function of the same name
// in the file of the same name under kernels/cpu/compressed/ (attention.cu: kernels/cpu/compressed/attention.h, ...),
// which acts on the same arrays the same way. The inputs' StepRowsView, StepTargets and state pointers are device
// memory here. Launch shapes
// depend only on the step's row and sequence counts and on max_region (the most entries any head slot's dense
// plus coded regions hold), never on the counts in device memory, so a step captured into a CUDA graph replays
// at any length.

namespace kvplan::cuda {

// Fused RoPE, key-norm scoring and append: keys_pre_rope ([rows, kv_heads, head_dim]) are rotated to their rows'
// positions and appended with values as in cpu::compressed_append; with key_norm_scores, each entry's score is
// its pre-RoPE key norm (the oracle: cpu::key_l2_norms, cpu::apply_rope, then cpu::compressed_append).
cudaError_t compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys_pre_rope,
                              const float* values, const float* inv_freq, float rope_attention_factor,
                              bool key_norm_scores, cudaStream_t stream);

// cpu::compressed_attention's output in bf16 (the O projection's input), split-KV so one decode row fills the
// GPU, as `plan` says (plan_compressed_attention for this layer, shape and step.rows rows; attention_schedule.h has
// it, CompressedAttentionShape, compressed_attention_supported and the workspace's size). row_stats ([rows, heads,
// 2]: softmax max and sum, nullable) feed entry_probabilities.
cudaError_t compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                                 const RefreshStateView* refresh, const CompressedAttentionShape& shape,
                                 const CompressedAttentionPlan& plan, const float* q, __nv_bfloat16* out,
                                 float* row_stats, void* workspace, cudaStream_t stream);
// The probabilities half of cpu::compressed_attention, from the attention's row_stats. With full_steps_only,
// only sequences on a RefreshKV full step are scored (nothing else reads them).
cudaError_t entry_probabilities(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                                const RefreshStateView* refresh, const CompressedAttentionShape& shape, const float* q,
                                const float* row_stats, bool full_steps_only, float* dense_probabilities,
                                float* coded_probabilities, cudaStream_t stream);

cudaError_t update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                          const float* dense_probabilities, const float* coded_probabilities, cudaStream_t stream);

cudaError_t refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                           const float* q, int heads, int head_dim, cudaStream_t stream);
// Overwrites the probabilities with their pooled values. position_workspace: refresh_select_workspace_bytes.
size_t refresh_select_workspace_bytes(int step_sequences, int kv_heads, int capacity);
cudaError_t refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                           const StepTargets& targets, const RefreshSettings& settings, float* dense_probabilities,
                           float* coded_probabilities, int capacity, float* position_workspace, cudaStream_t stream);

// At most this many entries leave one head in one eviction (the rows a step appends to a sequence bound it).
inline constexpr int kMaxEvictionsPerStep = 256;
cudaError_t evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                  const StepTargets& targets, const EvictionSettings& settings, cudaStream_t stream);

cudaError_t gather_leaving_entries(const CompressedLayer& layer, const CodingTables& tables, const StepRowsView& step,
                                   int coding_window, int max_leaving, float* keys, float* values,
                                   int32_t* leaving_slots, int32_t* leaving_count, cudaStream_t stream);
cudaError_t commit_leaving_entries(const CompressedLayer& layer, const StepRowsView& step, int max_leaving,
                                   const int32_t* leaving_slots, const int32_t* leaving_count,
                                   const uint32_t* key_codes, const uint32_t* value_codes, cudaStream_t stream);

// Benchmarks: cpu::fill_compressed_noise; fill's arrays in device memory.
cudaError_t fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill, cudaStream_t stream);

// Coding the gathered leaving rows: vectors x ([groups * group_size, dim]) are coded in up to kMaxCodingJobs jobs
// of one shape in one launch; with counts non-null only the first counts[g] vectors of each group are coded (the
// rest are left as they are).
inline constexpr int kMaxCodingJobs = 2;  // a layer's keys and values

// One matching pursuit (oracle cpu::matching_pursuit, codes packed with cpu::pack_code) over a dictionary ([atoms,
// dim] unit rows), `sparsity` atoms each into codes.
struct PursuitJob {
  const float* dictionary;
  const float* x;
  int sparsity;
  uint32_t* codes;
};
cudaError_t matching_pursuit(const PursuitJob* jobs, int job_count, int atoms, int dim, int groups, int group_size,
                             const int32_t* counts, cudaStream_t stream);

// Quantization to `bits`-bit integers, bit for bit cpu::quantize_vector, into QuantizedWords(dim, bits) words per
// vector; with channel_scale ([kv_heads, dim]) non-null, the vectors of group g are divided by its row
// g % kv_heads first (gather_leaving_entries' group g = step sequence * kv_heads + KV head). dim * bits must be a
// multiple of 32.
struct QuantizeJob {
  const float* x;
  int bits;
  const float* channel_scale;
  uint32_t* words;
};
cudaError_t quantize_vectors(const QuantizeJob* jobs, int job_count, int dim, int kv_heads, int groups, int group_size,
                             const int32_t* counts, cudaStream_t stream);

}  // namespace kvplan::cuda
