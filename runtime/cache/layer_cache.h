// Per-layer KV storage of the CPU runtime. The dense cache is the full-precision baseline; compressed caches
// (runtime/cache/compressed_cache.h) implement the same interface, so the forward pass is the same for both.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "loader/model_config.h"

namespace kvplan {

class LayerCache {
 public:
  virtual ~LayerCache() = default;
  // Rows of one sequence at consecutive positions. k_pre_rope, k (after RoPE), v: [rows, kv_heads, head_dim].
  virtual void Append(int sequence, const int32_t* positions, int rows, const float* k_pre_rope, const float* k,
                      const float* v) = 0;
  // Causal attention of the same rows' queries ([rows, heads, head_dim]) over the cache; may then compress it.
  virtual void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) = 0;
  // Attention for a layer that shares this cache: same entries, but no scoring, eviction or refresh
  // bookkeeping (the owning layer already did that this step).
  virtual void AttendShared(int sequence, const int32_t* positions, int rows, const float* q, float* out) {
    Attend(sequence, positions, rows, q, out);
  }
  virtual void Reset() = 0;
  virtual void ResetSequence(int sequence) = 0;
  // Fills positions [0, context) of every sequence with noise (for decode benchmarks).
  virtual void FillWithNoise(int context) = 0;
  // Bytes held for all sequences, counting K/V as the GPU stores them (bf16) and codes as their packed size.
  virtual int64_t bytes() const = 0;
  // False for a layer that reuses another layer's cache: the runtime then skips its K/V projections.
  virtual bool computes_kv() const { return true; }
};

// Builds one LayerCache per layer of a model whose sequences hold up to `capacity` positions and grow by at most
// `max_step_rows` rows per Append.
using LayerCacheFactory = std::function<std::vector<std::unique_ptr<LayerCache>>(
    const ModelConfig& config, int num_sequences, int capacity, int max_step_rows)>;

// The full cache: every position of every sequence, keys after RoPE.
std::unique_ptr<LayerCache> CreateDenseLayerCache(const ModelConfig& config, int num_sequences, int capacity);

}  // namespace kvplan
