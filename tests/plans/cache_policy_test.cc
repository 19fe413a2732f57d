// The cache policy: derived from a plan and written back losslessly, and the sizes it implies at a length.
#include "plans/cache_policy.h"

#include "gtest/gtest.h"

namespace kvplan {
namespace {

TEST(CachePolicyTest, PlanSettingsRoundTrip) {
  plan::Plan plan;
  plan.mutable_model()->set_num_layers(3);
  plan.mutable_model()->set_num_kv_heads(2);
  plan.mutable_model()->set_head_dim(8);
  const BudgetPolicy budget{.head_keep_fraction = {0.25f, 0.5f},
                            .scoring = plan::TokenBudgets::ATTENTION_SCORE,
                            .recent_window = 7,
                            .sink_tokens = 3,
                            .min_tokens = 5,
                            .merge_evicted = true,
                            .merge_compensation = 0.5f,
                            .score_decay = 0.9f};
  WriteBudgetPolicy(budget, plan.mutable_budgets());
  auto* layer_budget = plan.mutable_budgets()->add_layers();
  layer_budget->set_layer(1);
  for (float fraction : budget.head_keep_fraction) layer_budget->add_head_keep_fraction(fraction);
  const RefreshPolicy refresh{.small_cache_fraction = 0.25f,
                              .min_small_cache_tokens = 9,
                              .refresh_stride = 4,
                              .query_similarity_threshold = 0.5f,
                              .pool_kernel = 3};
  WriteRefreshPolicy(refresh, plan.mutable_refresh());
  plan.mutable_refresh()->add_layers(2);
  auto* share = plan.mutable_sharing()->add_shares();
  share->set_layer(2);
  share->set_donor(0);

  const CachePolicy policy = CachePolicyFromPlan(plan);
  ASSERT_EQ(policy.layers.size(), 3u);
  EXPECT_TRUE(policy.layers[0].keeps_full_cache());
  ASSERT_TRUE(policy.layers[1].budget.has_value());
  const BudgetPolicy& read = *policy.layers[1].budget;
  EXPECT_EQ(read.head_keep_fraction, budget.head_keep_fraction);
  EXPECT_EQ(read.scoring, budget.scoring);
  EXPECT_EQ(read.recent_window, 7);
  EXPECT_EQ(read.sink_tokens, 3);
  EXPECT_EQ(read.min_tokens, 5);
  EXPECT_TRUE(read.merge_evicted);
  EXPECT_FLOAT_EQ(read.merge_compensation, 0.5f);
  EXPECT_FLOAT_EQ(read.score_decay, 0.9f);
  EXPECT_EQ(policy.layers[2].donor, 0);
  ASSERT_TRUE(policy.layers[2].refresh.has_value());
  EXPECT_EQ(policy.layers[2].refresh->min_small_cache_tokens, 9);
  EXPECT_EQ(policy.layers[2].refresh->pool_kernel, 3);
}

TEST(CachePolicyTest, ExpectedEntriesFollowTheRules) {
  LayerPolicy layer;
  layer.budget = BudgetPolicy{
      .head_keep_fraction = {0.25f}, .recent_window = 8, .sink_tokens = 4, .min_tokens = 16, .merge_evicted = true};
  // Budget 25% of 200 = 50 plain tokens, plus the merged slot.
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 200), (HeadEntries{.dense = 50, .merged = 1}));
  // Sinks and the recent window are kept even when the budget is smaller; nothing evicted, no slot.
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 10), (HeadEntries{.dense = 10}));
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 40), (HeadEntries{.dense = 16, .merged = 1}));  // min_tokens 16
  EXPECT_EQ(KeptTokens(layer, 0, 40), 16);

  // A coding window wider than the budget's recent window is protected from eviction too.
  layer.coding = CodingPolicy{.key_sparsity = 2, .value_sparsity = 3, .recent_window = 32};
  EXPECT_EQ(ProtectedRecentTokens(layer), 32);
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 200), (HeadEntries{.dense = 32, .coded = 18, .merged = 1}));
  // Sinks + window: 36 kept of 40.
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 40), (HeadEntries{.dense = 32, .coded = 4, .merged = 1}));
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 0), HeadEntries{});

  const RefreshPolicy refresh{.small_cache_fraction = 0.125f, .min_small_cache_tokens = 20};
  EXPECT_EQ(SmallCacheTokens(refresh, 400), 50);
  EXPECT_EQ(SmallCacheTokens(refresh, 100), 20);
  EXPECT_EQ(SmallCacheTokens(refresh, 12), 12);  // never more than there are

  layer.donor = 0;
  EXPECT_EQ(ExpectedHeadEntries(layer, 0, 400), HeadEntries{});
  EXPECT_EQ(KeptTokens(layer, 0, 400), 0);
}

TEST(CachePolicyTest, BytesCountEveryStoredItem) {
  const int head_dim = 64;
  const int64_t dense_entry = 2 * head_dim * kCacheValueBytes;
  EXPECT_EQ(HeadBytes(LayerPolicy{}, head_dim, {.dense = 10}), 10 * dense_entry);
  LayerPolicy coded;
  coded.coding = CodingPolicy{.key_sparsity = 8, .value_sparsity = 6, .recent_window = 4};
  EXPECT_EQ(HeadBytes(coded, head_dim, {.dense = 4, .coded = 10}),
            4 * dense_entry + 10 * 14 * kCodeBytes + 14 * kPositionBytes);
  // Budgets add a score per entry and an fp32 merged slot.
  LayerPolicy budgeted;
  budgeted.budget = BudgetPolicy{.head_keep_fraction = {0.5f}};
  EXPECT_EQ(HeadBytes(budgeted, head_dim, {.dense = 10, .merged = 1}),
            10 * (dense_entry + kPositionBytes + kScoreBytes) + 2 * head_dim * kMergedValueBytes + kMergedCountBytes);
  // RefreshKV marks its selection with a flag per entry.
  LayerPolicy refreshed;
  refreshed.refresh = RefreshPolicy{};
  EXPECT_EQ(HeadBytes(refreshed, head_dim, {.dense = 10}), 10 * (dense_entry + kPositionBytes + kSelectionBytes));
  EXPECT_EQ(FullCacheBytes(2, 3, head_dim, 5), 2 * 3 * 5 * dense_entry);
  CachePolicy policy{.num_kv_heads = 3, .head_dim = head_dim, .layers = {LayerPolicy{}, LayerPolicy{.donor = 0}}};
  EXPECT_EQ(CacheBytes(policy, 5), FullCacheBytes(1, 3, head_dim, 5));
}

}  // namespace
}  // namespace kvplan
