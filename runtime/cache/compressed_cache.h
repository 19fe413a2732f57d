// Layer caches that execute a plan's decisions for one layer: sharing another layer's cache (KVSharer),
// coding entries against dictionaries (CSR), per-head token budgets with eviction and residual merging
// (L2-norm / attention scoring, ZeroMerge), and a periodically refreshed small cache (RefreshKV).
// Policies are plain structs: runtime/plan_runtime.h turns a plan file into them.
#pragma once

#include <memory>
#include <vector>

#include "runtime/cache/layer_cache.h"

namespace kvplan {

struct DictionaryPolicy {
  std::vector<float> key_atoms;    // [atoms, head_dim], unit rows; keys are coded before RoPE
  std::vector<float> value_atoms;  // [atoms, head_dim]
  int atoms = 0;
  int key_sparsity = 0;
  int value_sparsity = 0;
  int recent_window = 0;  // newest tokens stay uncoded
};

struct BudgetPolicy {
  enum class Scoring { kKeyL2Norm, kAttention };
  std::vector<float> head_keep_fraction;  // per KV head
  Scoring scoring = Scoring::kKeyL2Norm;
  int recent_window = 0;
  int sink_tokens = 0;
  int min_tokens = 0;
  bool merge_evicted = false;
  float merge_compensation = 1.0f;
  float score_decay = 1.0f;
};

struct RefreshPolicy {
  float small_cache_fraction = 0.125f;
  int min_small_cache_tokens = 0;
  int refresh_stride = 8;
  float query_similarity_threshold = 0.0f;
  int pool_kernel = 1;
};

struct LayerCachePolicy {
  const DictionaryPolicy* dictionary = nullptr;  // not owned; null: keep entries dense
  const BudgetPolicy* budget = nullptr;          // null: keep every token
  const RefreshPolicy* refresh = nullptr;        // null: always attend over everything kept
};

std::unique_ptr<LayerCache> CreateCompressedLayerCache(const ModelConfig& config, int num_sequences,
                                                       const LayerCachePolicy& policy);
// A layer that attends over `donor`'s cache and stores nothing (donor must outlive it).
std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor);

}  // namespace kvplan
