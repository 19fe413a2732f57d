#include "runtime/cache/cache_decisions.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvplan {

std::vector<int> ChooseEvictions(const LayerPolicy& layer, int kv_head, int64_t length,
                                 const std::vector<ScoredEntry>& entries) {
  const BudgetPolicy& budget = *layer.budget;
  const int64_t protected_from = length - ProtectedRecentTokens(layer);
  std::vector<int> candidates;
  for (int i = 0; i < int(entries.size()); ++i)
    if (entries[i].position >= budget.sink_tokens && entries[i].position < protected_from) candidates.push_back(i);
  const int64_t excess =
      std::min<int64_t>(int64_t(entries.size()) - HeadTokenBudget(budget, kv_head, length), int64_t(candidates.size()));
  if (excess <= 0) return {};
  const bool by_norm = budget.scoring == plan::TokenBudgets::KEY_L2_NORM;
  std::partial_sort(candidates.begin(), candidates.begin() + excess, candidates.end(), [&](int a, int b) {
    const ScoredEntry& x = entries[a];
    const ScoredEntry& y = entries[b];
    if (x.score != y.score) return by_norm ? x.score > y.score : x.score < y.score;
    return x.position < y.position;
  });
  candidates.resize(excess);
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

bool LeavesCodingWindow(const CodingPolicy& coding, int64_t length, int32_t position) {
  return position < length - coding.recent_window;
}

bool NeedsFullStep(const RefreshPolicy& refresh, const RefreshState& state, const std::vector<float>& mean_query) {
  if (state.query.empty() || state.steps_since_refresh + 1 >= refresh.refresh_stride) return true;
  return refresh.query_similarity_threshold > 0.0f &&
         Cosine(mean_query, state.query) < refresh.query_similarity_threshold;
}

std::vector<int32_t> SelectRefreshPositions(const RefreshPolicy& refresh, int64_t length,
                                            std::vector<std::pair<int32_t, float>> scored) {
  std::sort(scored.begin(), scored.end());
  const int n = int(scored.size());
  std::vector<float> pooled(n);
  const int radius = refresh.pool_kernel / 2;
  for (int i = 0; i < n; ++i) {
    pooled[i] = scored[i].second;
    for (int j = std::max(0, i - radius); j <= std::min(n - 1, i + radius); ++j)
      pooled[i] = std::max(pooled[i], scored[j].second);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  const int keep = int(std::min<int64_t>(SmallCacheTokens(refresh, length), n));
  // Ties go to the newer position.
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int a, int b) { return pooled[a] != pooled[b] ? pooled[a] > pooled[b] : a > b; });
  std::vector<int32_t> selected(keep);
  for (int i = 0; i < keep; ++i) selected[i] = scored[order[i]].first;
  std::sort(selected.begin(), selected.end());
  return selected;
}

float Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  return float(dot / std::sqrt(std::max(na * nb, 1e-30)));
}

}  // namespace kvplan
