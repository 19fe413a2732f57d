#include "plans/cache_policy.h"

#include <algorithm>
#include <cmath>

namespace kvplan {

CachePolicy CachePolicyFromPlan(const plan::Plan& plan) {
  CachePolicy policy;
  policy.num_kv_heads = plan.model().num_kv_heads();
  policy.head_dim = plan.model().head_dim();
  policy.layers.resize(std::max(0, plan.model().num_layers()));
  for (const auto& share : plan.sharing().shares()) policy.layers[share.layer()].donor = share.donor();

  const plan::SparseCoding& coding = plan.sparse_coding();
  for (const auto& entry : coding.layers())
    policy.layers[entry.layer()].coding = CodingPolicy{.key_sparsity = coding.key_sparsity(),
                                                       .value_sparsity = coding.value_sparsity(),
                                                       .recent_window = coding.recent_window()};

  const plan::TokenBudgets& budgets = plan.budgets();
  for (const auto& layer : budgets.layers())
    policy.layers[layer.layer()].budget =
        BudgetPolicy{.head_keep_fraction = {layer.head_keep_fraction().begin(), layer.head_keep_fraction().end()},
                     .scoring = budgets.scoring(),
                     .recent_window = budgets.recent_window(),
                     .sink_tokens = budgets.sink_tokens(),
                     .min_tokens = budgets.min_tokens(),
                     .merge_evicted = budgets.merge_evicted(),
                     .merge_compensation = budgets.merge_compensation(),
                     // Plans before score_decay existed leave it 0: scores then accumulate undecayed.
                     .score_decay = budgets.score_decay() > 0 ? budgets.score_decay() : 1.0f};

  const plan::RefreshSchedule& refresh = plan.refresh();
  for (int layer : refresh.layers())
    policy.layers[layer].refresh = RefreshPolicy{.small_cache_fraction = refresh.small_cache_fraction(),
                                                 .min_small_cache_tokens = refresh.min_small_cache_tokens(),
                                                 .refresh_stride = refresh.refresh_stride(),
                                                 .query_similarity_threshold = refresh.query_similarity_threshold(),
                                                 .pool_kernel = std::max(1, refresh.pool_kernel())};
  return policy;
}

void WriteBudgetPolicy(const BudgetPolicy& policy, plan::TokenBudgets* budgets) {
  budgets->set_scoring(policy.scoring);
  budgets->set_recent_window(policy.recent_window);
  budgets->set_sink_tokens(policy.sink_tokens);
  budgets->set_min_tokens(policy.min_tokens);
  budgets->set_merge_evicted(policy.merge_evicted);
  budgets->set_merge_compensation(policy.merge_compensation);
  budgets->set_score_decay(policy.score_decay);
}

void WriteRefreshPolicy(const RefreshPolicy& policy, plan::RefreshSchedule* refresh) {
  refresh->set_small_cache_fraction(policy.small_cache_fraction);
  refresh->set_min_small_cache_tokens(policy.min_small_cache_tokens);
  refresh->set_refresh_stride(policy.refresh_stride);
  refresh->set_query_similarity_threshold(policy.query_similarity_threshold);
  refresh->set_pool_kernel(policy.pool_kernel);
}

int64_t HeadTokenBudget(const BudgetPolicy& budget, int kv_head, int64_t length) {
  return std::max<int64_t>(budget.min_tokens, int64_t(std::ceil(budget.head_keep_fraction[kv_head] * length)));
}

int64_t ProtectedRecentTokens(const LayerPolicy& layer) {
  int64_t tokens = layer.budget ? layer.budget->recent_window : 0;
  if (layer.coding) tokens = std::max<int64_t>(tokens, layer.coding->recent_window);
  return tokens;
}

int64_t SmallCacheTokens(const RefreshPolicy& refresh, int64_t length) {
  const int64_t wanted =
      std::max<int64_t>(refresh.min_small_cache_tokens, int64_t(std::ceil(refresh.small_cache_fraction * length)));
  return std::min(wanted, length);
}

HeadEntries ExpectedHeadEntries(const LayerPolicy& layer, int kv_head, int64_t length) {
  HeadEntries entries;
  if (layer.shares()) return entries;
  // Eviction removes candidates (neither sinks nor protected) until the budget is met, and the budget never
  // shrinks as the sequence grows, so what a head keeps depends on the length alone.
  int64_t plain = length;
  int64_t merged_slots = 0;
  if (layer.budget) {
    const BudgetPolicy& budget = *layer.budget;
    plain = std::min(
        length, std::max(HeadTokenBudget(budget, kv_head, length), budget.sink_tokens + ProtectedRecentTokens(layer)));
    if (budget.merge_evicted && plain < length) merged_slots = 1;
  }
  // Every kept token older than the coding window is coded; the window itself is protected from eviction.
  const int64_t dense_plain = layer.coding ? std::min<int64_t>(plain, layer.coding->recent_window) : plain;
  entries.dense = dense_plain + merged_slots;
  entries.coded = plain - dense_plain;
  if (layer.refresh) entries.selected = SmallCacheTokens(*layer.refresh, length);
  return entries;
}

int64_t HeadBytes(const LayerPolicy& layer, int head_dim, const HeadEntries& entries) {
  const int64_t dense_entry = 2 * int64_t(head_dim) * kCacheValueBytes;
  const int64_t coded_entry =
      layer.coding ? int64_t(layer.coding->key_sparsity + layer.coding->value_sparsity) * kCodeBytes : 0;
  int64_t bytes = entries.dense * dense_entry + entries.coded * coded_entry + entries.selected * kPositionBytes;
  // Evicting or coding breaks the position == entry index identity, so each entry carries its position.
  if (layer.budget || layer.coding) bytes += (entries.dense + entries.coded) * kPositionBytes;
  return bytes;
}

int64_t CacheBytes(const CachePolicy& policy, int64_t length) {
  int64_t total = 0;
  for (const LayerPolicy& layer : policy.layers)
    for (int h = 0; h < policy.num_kv_heads; ++h)
      total += HeadBytes(layer, policy.head_dim, ExpectedHeadEntries(layer, h, length));
  return total;
}

int64_t FullCacheBytes(int num_layers, int num_kv_heads, int head_dim, int64_t length) {
  return int64_t(num_layers) * num_kv_heads * HeadBytes(LayerPolicy{}, head_dim, {.dense = length});
}

}  // namespace kvplan
