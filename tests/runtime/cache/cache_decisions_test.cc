// The compressed cache's decisions on hand-made positions and scores.
#include "runtime/cache/cache_decisions.h"

#include "gtest/gtest.h"

namespace kvplan {
namespace {

std::vector<ScoredEntry> Entries(const std::vector<float>& scores) {
  std::vector<ScoredEntry> entries;
  for (int i = 0; i < int(scores.size()); ++i) entries.push_back({int32_t(i), scores[i]});
  return entries;
}

TEST(CacheDecisionsTest, EvictionKeepsSinksRecentAndTheBestScores) {
  LayerPolicy layer;
  layer.budget = BudgetPolicy{.head_keep_fraction = {0.5f}, .recent_window = 2, .sink_tokens = 1, .min_tokens = 0};
  // 10 tokens, budget 5: sink 0 and recent 8, 9 stay; of 1..7 the two lowest norms (3 and 6) stay.
  const std::vector<float> norms = {9, 5, 4, 1, 7, 6, 2, 3, 8, 9};
  EXPECT_EQ(ChooseEvictions(layer, 0, 10, Entries(norms)), (std::vector<int>{1, 2, 4, 5, 7}));
  layer.budget->scoring = plan::TokenBudgets::ATTENTION_SCORE;  // now the most attended stay: 1 and 5
  const std::vector<float> attention = {0, 0.9f, 0.1f, 0.2f, 0.3f, 0.8f, 0.1f, 0.1f, 0, 0};
  EXPECT_EQ(ChooseEvictions(layer, 0, 10, Entries(attention)), (std::vector<int>{2, 3, 4, 6, 7}));
  // Ties: the older entry goes first.
  EXPECT_EQ(ChooseEvictions(layer, 0, 10, Entries(std::vector<float>(10, 1.0f))), (std::vector<int>{1, 2, 3, 4, 5}));
  // Within budget: nothing.
  layer.budget->head_keep_fraction = {1.0f};
  EXPECT_TRUE(ChooseEvictions(layer, 0, 10, Entries(norms)).empty());
}

TEST(CacheDecisionsTest, CodingWindowIsProtectedFromEviction) {
  LayerPolicy layer;
  layer.budget = BudgetPolicy{.head_keep_fraction = {0.1f}, .recent_window = 1, .sink_tokens = 0, .min_tokens = 0};
  layer.coding = CodingPolicy{.key_sparsity = 1, .value_sparsity = 1, .recent_window = 4};
  const std::vector<int> victims = ChooseEvictions(layer, 0, 10, Entries(std::vector<float>(10, 1.0f)));
  EXPECT_EQ(victims, (std::vector<int>{0, 1, 2, 3, 4, 5}));  // 6..9 form the coding window
  EXPECT_TRUE(LeavesCodingWindow(*layer.coding, 10, 5));
  EXPECT_FALSE(LeavesCodingWindow(*layer.coding, 10, 6));
}

TEST(CacheDecisionsTest, RefreshStepsAndSelection) {
  const RefreshPolicy refresh{.small_cache_fraction = 0.25f,
                              .min_small_cache_tokens = 2,
                              .refresh_stride = 3,
                              .query_similarity_threshold = 0.5f,
                              .pool_kernel = 1};
  EXPECT_TRUE(NeedsFullStep(refresh, {}, {1, 0}));  // nothing selected yet
  RefreshState state{.refresh_position = 4, .steps_since_refresh = 0, .query = {1, 0}};
  EXPECT_FALSE(NeedsFullStep(refresh, state, {1, 0.1f}));
  EXPECT_TRUE(NeedsFullStep(refresh, state, {0, 1}));  // the query moved
  state.steps_since_refresh = 2;
  EXPECT_TRUE(NeedsFullStep(refresh, state, {1, 0}));  // the stride is due

  // 8 tokens: 2 selected, the most attended.
  const std::vector<std::pair<int32_t, float>> scored = {{5, 0.1f}, {0, 0.3f}, {2, 0.05f}, {7, 0.4f},
                                                         {1, 0.0f}, {3, 0.1f}, {4, 0.02f}, {6, 0.03f}};
  EXPECT_EQ(SelectRefreshPositions(refresh, 8, scored), (std::vector<int32_t>{0, 7}));
  // Max-pooling over 3 neighbours spreads position 7's weight to 6: ties go to the newer position.
  RefreshPolicy pooled = refresh;
  pooled.pool_kernel = 3;
  EXPECT_EQ(SelectRefreshPositions(pooled, 8, scored), (std::vector<int32_t>{6, 7}));
}

}  // namespace
}  // namespace kvplan
