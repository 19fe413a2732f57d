// CUDA kernels of the GPU runtime. Raw pointers in, cudaError_t out: no framework, abseil or protobuf types,
// so this header and its .cu files build with nvcc alone. Each kernel's CPU oracle is in kernels/cpu_reference.h.
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

// x[r, :] += bias, for the q/k/v biases of Qwen2-style attention.
cudaError_t add_row_bias(float* x, const float* bias, int rows, int dim, cudaStream_t stream);

// out = bf16(silu(gate) * up).
cudaError_t swiglu(const float* gate, const float* up, int64_t n, __nv_bfloat16* out, cudaStream_t stream);

// Writes k, v ([rows, kv_heads, head_dim]) of row r to entry row_position[r] of sequence row_sequence[r].
cudaError_t append_kv(const float* k, const float* v, const int32_t* row_sequence, const int32_t* row_position,
                      int rows, int kv_heads, int head_dim, int capacity, __nv_bfloat16* k_cache,
                      __nv_bfloat16* v_cache, cudaStream_t stream);

// Causal GQA attention over the full cache: row r attends to entries 0..row_position[r] (the last
// sliding_window of them when sliding_window > 0) of sequence row_sequence[r]. Split-KV (flash-decoding):
// partial softmax per chunk of the cache, then a combine pass, so one decode row still fills the GPU.
// head_dim must be 32, 64, 128 or 256 and heads / kv_heads at most 8 (attention_supported says).
// workspace: attention_workspace_bytes(rows, heads, head_dim, max_context) bytes.
bool attention_supported(int heads, int kv_heads, int head_dim);
size_t attention_workspace_bytes(int rows, int heads, int head_dim, int max_context);
cudaError_t attention(const float* q, const int32_t* row_sequence, const int32_t* row_position, int rows, int heads,
                      int kv_heads, int head_dim, int capacity, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, float scale, int sliding_window, int max_context, void* workspace,
                      __nv_bfloat16* out, cudaStream_t stream);

}  // namespace kvplan::cuda

// --- Compressed caches (CPU oracles: cpu::sparse_attention, cpu::matching_pursuit, cpu::key_l2_norms,
// cpu::merge_into_slot) ----------------------------------------------------------------------------------

namespace kvplan::cuda {

// One sequence's compressed cache, KV heads concatenated (CSR-style offsets). Coded entries hold keys before
// RoPE and values as (atom, fp16 coefficient) pairs; dense entries hold keys after RoPE.
struct CompressedCacheView {
  const int32_t* coded_offsets = nullptr;  // [kv_heads + 1]
  const uint16_t* key_atoms = nullptr;     // [coded, key_sparsity]
  const __half* key_coefficients = nullptr;
  const uint16_t* value_atoms = nullptr;  // [coded, value_sparsity]
  const __half* value_coefficients = nullptr;
  const int32_t* coded_positions = nullptr;
  const int32_t* dense_offsets = nullptr;  // [kv_heads + 1]
  const float* dense_keys = nullptr;       // [dense, head_dim]
  const float* dense_values = nullptr;
  const int32_t* dense_positions = nullptr;
  const float* dense_bias = nullptr;  // [dense] or null
};

struct SparseAttentionShape {
  int rows = 0, heads = 0, kv_heads = 0, head_dim = 0;  // head_dim: 64, 128 or 256
  int key_sparsity = 0, value_sparsity = 0;
  float scale = 1.0f;
  float rope_attention_factor = 1.0f;
  // Entry counts from the host's bookkeeping (plans/cache_policy.h fixes them), so a launch reads nothing back:
  // the most entries (coded + dense) any KV head holds, and all heads' entries together.
  int max_entries_per_head = 0;
  int total_entries = 0;
};

// Attention of rows ([rows, heads, head_dim] queries at query_positions) over a compressed cache, decoding
// keys (with RoPE at their positions) and values from the dictionaries on the fly; split-KV like attention()
// so a single decode row fills the GPU. With probabilities non-null, also writes each entry's softmax
// probability maxed over all rows and the group's heads, laid out like cpu::sparse_attention's (that path
// runs unsplit). workspace: sparse_attention_workspace_bytes(...).
bool sparse_attention_supported(int heads, int kv_heads, int head_dim);
size_t sparse_attention_workspace_bytes(const SparseAttentionShape& shape, bool probabilities);
cudaError_t sparse_attention(const SparseAttentionShape& shape, const float* q, const int32_t* query_positions,
                             const CompressedCacheView& cache, const float* key_dictionary,
                             const float* value_dictionary, const float* inv_freq, float* out, float* probabilities,
                             void* workspace, cudaStream_t stream);

// Codes n vectors ([n, dim]) by matching pursuit over unit-norm atoms; coefficients rounded to fp16.
cudaError_t matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int n, int sparsity,
                             uint16_t* indices, __half* coefficients, cudaStream_t stream);

// norms[i] = ||keys[i, :]||.
cudaError_t key_l2_norms(const float* keys, int n, int head_dim, float* norms, cudaStream_t stream);

// Folds count victims into a residual slot's running mean (same order and arithmetic as the CPU oracle).
cudaError_t merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                            float* slot_value, float* slot_tokens, cudaStream_t stream);

}  // namespace kvplan::cuda
