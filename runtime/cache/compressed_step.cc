#include "runtime/cache/compressed_step.h"

#include <algorithm>

namespace kvplan {

CompressedRegions PlanRegions(const LayerPolicy& policy, int num_sequences, int kv_heads, int capacity,
                              int max_step_rows) {
  CompressedRegions regions;
  regions.dense_begin.push_back(0);
  regions.coded_begin.push_back(0);
  for (int s = 0; s < num_sequences; ++s)
    for (int h = 0; h < kv_heads; ++h) {
      // KeptTokens never shrinks as the length grows, so its value at the capacity bounds every step.
      const int64_t kept = KeptTokens(policy, h, capacity);
      const int64_t before_compression = policy.coding ? policy.coding->recent_window : kept;
      const int64_t dense = std::min<int64_t>(capacity, before_compression + max_step_rows);
      const int64_t coded = policy.coding ? kept : 0;
      regions.dense_begin.push_back(regions.dense_begin.back() + int32_t(dense));
      regions.coded_begin.push_back(regions.coded_begin.back() + int32_t(coded));
    }
  return regions;
}

CompressedArrayShape ArrayShapeOf(const LayerPolicy& policy, int num_sequences, int kv_heads, int head_dim) {
  return CompressedArrayShape{.head_slots = num_sequences * kv_heads,
                              .kv_heads = kv_heads,
                              .head_dim = head_dim,
                              .key_sparsity = policy.coding ? policy.coding->key_sparsity : 0,
                              .value_sparsity = policy.coding ? policy.coding->value_sparsity : 0,
                              .scores = bool(policy.budget),
                              .selected = bool(policy.refresh),
                              .merged = policy.budget && policy.budget->merge_evicted};
}

StepGroups GroupRows(const int32_t* row_sequence, const int32_t* row_position, int rows) {
  StepGroups groups;
  for (int r = 0; r < rows; ++r) {
    if (r == 0 || row_sequence[r] != row_sequence[r - 1]) {
      groups.sequence.push_back(row_sequence[r]);
      groups.row_begin.push_back(r);
      groups.length.push_back(0);
    }
    groups.length.back() = row_position[r] + 1;
  }
  groups.row_begin.push_back(rows);
  for (size_t j = 0; j + 1 < groups.row_begin.size(); ++j)
    groups.max_rows = std::max(groups.max_rows, groups.row_begin[j + 1] - groups.row_begin[j]);
  return groups;
}

StepRowsView ViewOf(const StepGroups& groups, const int32_t* row_sequence, const int32_t* row_position, int rows) {
  return StepRowsView{.rows = rows,
                      .row_sequence = row_sequence,
                      .row_position = row_position,
                      .sequences = int(groups.sequence.size()),
                      .sequence = groups.sequence.data(),
                      .row_begin = groups.row_begin.data()};
}

StepCounts CountsForStep(const LayerPolicy& policy, int kv_heads, const StepGroups& groups) {
  StepCounts counts;
  for (int32_t length : groups.length)
    for (int h = 0; h < kv_heads; ++h) {
      counts.kept.push_back(int32_t(KeptTokens(policy, h, length)));
      counts.selected.push_back(policy.refresh ? int32_t(SmallCacheTokens(*policy.refresh, length)) : 0);
    }
  return counts;
}

EvictionSettings EvictionSettingsOf(const LayerPolicy& policy) {
  if (!policy.budget) return {};
  const BudgetPolicy& budget = *policy.budget;
  return EvictionSettings{.keep_low_key_norms = budget.scoring == plan::TokenBudgets::KEY_L2_NORM,
                          .sink_tokens = budget.sink_tokens,
                          .protected_recent = int(ProtectedRecentTokens(policy)),
                          .merge_evicted = budget.merge_evicted};
}

RefreshSettings RefreshSettingsOf(const RefreshPolicy& refresh) {
  return RefreshSettings{.refresh_stride = refresh.refresh_stride,
                         .query_similarity_threshold = refresh.query_similarity_threshold,
                         .pool_kernel = refresh.pool_kernel};
}

bool NeedsProbabilities(const LayerPolicy& policy) {
  return policy.refresh || (policy.budget && policy.budget->scoring == plan::TokenBudgets::ATTENTION_SCORE);
}

}  // namespace kvplan
