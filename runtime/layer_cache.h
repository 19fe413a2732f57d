// Per-layer KV storage of the CPU runtime. The dense cache is the full-precision baseline; compressed caches
// (runtime/compressed_cache.h) implement the same interface, so the forward pass is the same for both.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/model_config.h"

namespace kvplan {

// Sees a layer's tensors during a forward pass (calibration collects statistics through it).
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // [rows, heads, head_dim] queries and [rows, kv_heads, head_dim] keys after RoPE; keys before RoPE; values.
  virtual void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                         const float* v) = 0;
  // [rows, hidden] after the final norm.
  virtual void OnFinalHidden(int rows, const float* hidden) = 0;
};

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
  // Fills positions [0, context) of every sequence with noise (for decode benchmarks).
  virtual void FillWithNoise(int context) = 0;
  // Bytes held for all sequences, counting K/V as the GPU stores them (bf16) and codes as their packed size.
  virtual int64_t bytes() const = 0;
  // False for a layer that reuses another layer's cache: the runtime then skips its K/V projections.
  virtual bool computes_kv() const { return true; }
};

// The full cache: every position of every sequence, keys after RoPE.
std::unique_ptr<LayerCache> CreateDenseLayerCache(const ModelConfig& config, int num_sequences, int capacity);

}  // namespace kvplan
