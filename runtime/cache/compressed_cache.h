// The CPU runtime's compressed layer caches: the arrays of kernels/compressed_layout.h in host memory, driven by
// the CPU references of the CUDA kernels in the order runtime/cache/compressed_step.h fixes.
// runtime/cache/plan_policies.h builds them from a plan.
#pragma once

#include <memory>
#include <vector>

#include "plans/cache_policy.h"
#include "runtime/cache/layer_cache.h"

namespace kvplan {

// What a coded layer codes against: CSR dictionaries (unit-norm rows), or a quantized layer's key channel scales.
struct LayerCodebook {
  int atoms = 0;
  std::vector<float> key_atoms;          // [atoms, head_dim]
  std::vector<float> value_atoms;        // [atoms, head_dim]
  std::vector<float> key_channel_scale;  // [kv_heads, head_dim]; quantized layers
};

// A cache executing `policy` (which must not share: see CreateSharedLayerCache) for up to `capacity` positions
// per sequence, appended at most `max_step_rows` rows of a sequence at a time; `codebook` is required
// exactly when the policy codes.
std::unique_ptr<LayerCache> CreateCompressedLayerCache(const ModelConfig& config, int num_sequences, int capacity,
                                                       int max_step_rows, const LayerPolicy& policy,
                                                       std::shared_ptr<const LayerCodebook> codebook);
// A layer that attends over `donor`'s cache and stores nothing (donor must outlive it).
std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor);

}  // namespace kvplan
