// CPU reference implementations of every kernel kvplan runs. They are the oracle the CUDA kernels are
// tested against and the CPU runtime's execution path, so they favour clarity and fp32 accuracy.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// out[r, :] = x[r, :] / rms(x[r, :]) * weight.  x, out: [rows, dim].
void rms_norm(const float* x, const float* weight, int64_t rows, int dim, float eps, float* out);

// Rotates x in place with the rotate-half (GPT-NeoX / HF Llama) layout: dims i and i + head_dim/2 form a pair.
// x: [tokens, heads, head_dim]; positions: [tokens]; inv_freq: [head_dim / 2].
// attention_factor scales cos/sin (1 except for YaRN).
void apply_rope(float* x, const int32_t* positions, const float* inv_freq, int tokens, int heads, int head_dim,
                float attention_factor);

// x[r, :] += bias.
void add_row_bias(float* x, const float* bias, int64_t rows, int dim);

// out = silu(gate) * up, elementwise over n values.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// The cached tokens of one KV head. Entries need not be contiguous in position (compressed caches evict and
// merge), so each carries its own position; logit_bias (nullable) is added to the entry's attention logit,
// which is how merged entries stand for the several tokens they replaced.
struct KvHeadView {
  const float* keys = nullptr;    // [length, head_dim]
  const float* values = nullptr;  // [length, head_dim]
  const int32_t* positions = nullptr;  // [length]
  const float* logit_bias = nullptr;   // [length] or null
  int length = 0;
};

// Causal grouped-query attention of `tokens` queries over a cache. Query t of head h sees entry j of KV head
// h / (heads / kv_heads) when positions[j] <= query_positions[t] and, with sliding_window > 0, when
// query_positions[t] - positions[j] < sliding_window.
// q, out: [tokens, heads, head_dim].  A query that sees no entry gets a zero output.
void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out);

}  // namespace kvplan::cpu
