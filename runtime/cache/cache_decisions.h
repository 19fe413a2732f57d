// The decisions of a compressed cache, as pure functions of positions and scores: which entries a budget evicts,
// which leave the recent window to be coded, when RefreshKV takes a full step and what it then selects. Every
// backend's storage calls these, so the CPU and GPU caches decide alike; how many entries each decision leaves
// is fixed by plans/cache_policy.h, so hosts know every count without reading storage back.
#pragma once

#include <cstdint>
#include <vector>

#include "plans/cache_policy.h"

namespace kvplan {

// A plain (not merged) entry of one KV head, as eviction sees it.
struct ScoredEntry {
  int32_t position = 0;
  float score = 0;  // key L2 norm, or decayed accumulated attention
};

// Indices into `entries` (ascending) to evict at `length` tokens so the head keeps HeadTokenBudget plain
// entries, taking neither sinks nor the ProtectedRecentTokens newest. Victims are the highest key norms (L2
// scoring keeps the lowest) or the least attended, older first on ties.
std::vector<int> ChooseEvictions(const LayerPolicy& layer, int kv_head, int64_t length,
                                 const std::vector<ScoredEntry>& entries);

// Whether a plain dense entry at `position` has left a coded layer's recent window at `length` tokens.
bool LeavesCodingWindow(const CodingPolicy& coding, int64_t length, int32_t position);

// Where RefreshKV stands for one sequence of one layer.
struct RefreshState {
  int32_t refresh_position = 0;  // tokens at or after this were appended since the last full step
  int steps_since_refresh = 0;
  std::vector<float> query;  // [head_dim] mean query of the last full step; empty before the first
};

// A full step attends over everything kept and rebuilds the selection: the first step, every refresh_stride
// steps, and whenever the step's mean query (mean over query heads of the last row, [head_dim]) drifts below
// the similarity threshold from the last full step's.
bool NeedsFullStep(const RefreshPolicy& refresh, const RefreshState& state, const std::vector<float>& mean_query);

// The positions (ascending) the small cache keeps until the next full step: the SmallCacheTokens(length) most
// attended, after max-pooling each position's probability over pool_kernel neighbours. scored: (position,
// attention probability) of every entry the full step saw, in any order.
std::vector<int32_t> SelectRefreshPositions(const RefreshPolicy& refresh, int64_t length,
                                            std::vector<std::pair<int32_t, float>> scored);

// cos(a, b), 0 for a zero vector.
float Cosine(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace kvplan
