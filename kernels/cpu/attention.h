// CPU oracle of attention over the full cache (kernels/cuda/attention.cu); the dense cache of the CPU runtime
// runs it.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// The cached tokens of one KV head of the full cache, each with its position.
struct KvHeadView {
  const float* keys = nullptr;         // [length, head_dim]
  const float* values = nullptr;       // [length, head_dim]
  const int32_t* positions = nullptr;  // [length]
  int length = 0;
};

// Causal grouped-query attention of `tokens` queries over a cache. Query t of head h sees entry j of KV head
// h / (heads / kv_heads) when positions[j] <= query_positions[t] and, with sliding_window > 0, when
// query_positions[t] - positions[j] < sliding_window.
// q, out: [tokens, heads, head_dim].  A query that sees no entry gets a zero output.
void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out);

}  // namespace kvplan::cpu
