// The CPU runtime's compressed layer caches: host vectors that store what a layer's policy keeps (dense recent
// entries and merged slots, sparse codes, RefreshKV selections) and act on the decisions of
// runtime/cache/cache_decisions.h. runtime/cache/plan_policies.h builds them from a plan.
#pragma once

#include <memory>
#include <vector>

#include "plans/cache_policy.h"
#include "runtime/cache/layer_cache.h"

namespace kvplan {

// The dictionaries a coded layer codes against: unit-norm rows; keys are coded before RoPE.
struct LayerDictionaries {
  int atoms = 0;
  std::vector<float> key_atoms;    // [atoms, head_dim]
  std::vector<float> value_atoms;  // [atoms, head_dim]
};

// A cache executing `policy` (which must not share: see CreateSharedLayerCache); `dictionaries` is required
// exactly when the policy codes.
std::unique_ptr<LayerCache> CreateCompressedLayerCache(const ModelConfig& config, int num_sequences,
                                                       const LayerPolicy& policy,
                                                       std::shared_ptr<const LayerDictionaries> dictionaries);
// A layer that attends over `donor`'s cache and stores nothing (donor must outlive it).
std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor);

}  // namespace kvplan
