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
                                                       .recent_window = coding.recent_window(),
                                                       .keys_after_rope = coding.keys_coded_after_rope()};
  const plan::KvQuantization& quantization = plan.quantization();
  for (const auto& entry : quantization.layers())
    policy.layers[entry.layer()].coding =
        CodingPolicy{.key_sparsity = QuantizedWords(policy.head_dim, entry.key_bits()),
                     .value_sparsity = QuantizedWords(policy.head_dim, entry.value_bits()),
                     .key_bits = entry.key_bits(),
                     .value_bits = entry.value_bits(),
                     .recent_window = quantization.recent_window(),
                     .keys_after_rope = true};

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

int64_t KeptTokens(const LayerPolicy& layer, int kv_head, int64_t length) {
  if (layer.shares()) return 0;
  if (!layer.budget) return length;
  const BudgetPolicy& budget = *layer.budget;
  return std::min(
      length, std::max(HeadTokenBudget(budget, kv_head, length), budget.sink_tokens + ProtectedRecentTokens(layer)));
}

HeadEntries ExpectedHeadEntries(const LayerPolicy& layer, int kv_head, int64_t length) {
  HeadEntries entries;
  if (layer.shares()) return entries;
  const int64_t kept = KeptTokens(layer, kv_head, length);
  // Every kept token older than the coding window is coded; the window itself is protected from eviction.
  entries.dense = layer.coding ? std::min<int64_t>(kept, layer.coding->recent_window) : kept;
  entries.coded = kept - entries.dense;
  entries.merged = layer.budget && layer.budget->merge_evicted && kept < length ? 1 : 0;
  return entries;
}

int64_t HeadBytes(const LayerPolicy& layer, int head_dim, const HeadEntries& entries) {
  const int64_t dense_entry = 2 * int64_t(head_dim) * kCacheValueBytes;
  const int64_t coded_entry =
      layer.coding ? int64_t(layer.coding->key_sparsity + layer.coding->value_sparsity) * kCodeBytes : 0;
  const int64_t merged_entry = 2 * int64_t(head_dim) * kMergedValueBytes + kMergedCountBytes;
  int64_t per_entry = 0;  // what every plain entry carries beside its K/V or codes
  if (layer.stores_compressed()) per_entry += kPositionBytes;
  if (layer.budget) per_entry += kScoreBytes;
  if (layer.refresh) per_entry += kSelectionBytes;
  return entries.dense * dense_entry + entries.coded * coded_entry + entries.merged * merged_entry +
         (entries.dense + entries.coded) * per_entry;
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
