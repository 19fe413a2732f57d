// CUDA kernels of the GPU runtime. Raw pointers in, cudaError_t out: no framework, abseil or protobuf types,
// so this header and its .cu files build with nvcc alone. Each kernel's CPU oracle is in kernels/cpu_reference.h.
//
// Layouts (row-major):
//   activations          [rows, dim]                          rows = tokens of one step across the batch
//   q / k / v            [rows, heads, head_dim]
//   KV cache per layer   [sequences, kv_heads, capacity, head_dim] bf16; entry j holds position j
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvplan::cuda {

// out[r, :] = float(table[tokens[r], :]).
cudaError_t embed_tokens(const __nv_bfloat16* table, const int32_t* tokens, int rows, int dim, float* out,
                         cudaStream_t stream);

// out = bf16(x / rms(x) * weight), one row per block.
cudaError_t rms_norm(const float* x, const __nv_bfloat16* weight, int rows, int dim, float eps,
                     __nv_bfloat16* out, cudaStream_t stream);

// Rotate-half RoPE in place; x: [rows, heads, head_dim], positions: [rows], inv_freq: [head_dim / 2].
cudaError_t apply_rope(float* x, const int32_t* positions, const float* inv_freq, int rows, int heads,
                       int head_dim, float attention_factor, cudaStream_t stream);

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
cudaError_t attention(const float* q, const int32_t* row_sequence, const int32_t* row_position, int rows,
                      int heads, int kv_heads, int head_dim, int capacity, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, float scale, int sliding_window, int max_context,
                      void* workspace, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace kvplan::cuda
