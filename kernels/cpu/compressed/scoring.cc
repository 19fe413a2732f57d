#include "kernels/cpu/compressed/scoring.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/compressed/common.h"

namespace kvplan::cpu {

void update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                   const float* dense_probabilities, const float* coded_probabilities) {
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot)
        layer.dense_scores[slot] = layer.dense_scores[slot] * decay + dense_probabilities[slot];
      if (layer.coded_count == nullptr) continue;
      for (int64_t slot = layer.coded_begin[head]; slot < layer.coded_begin[head] + layer.coded_count[head]; ++slot)
        layer.coded_scores[slot] = layer.coded_scores[slot] * decay + coded_probabilities[slot];
    }
}

void refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                    const float* q, int heads, int head_dim) {
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    const float* last = q + int64_t(step.row_begin[j + 1] - 1) * heads * head_dim;
    float* mean = state.step_query + int64_t(sequence) * head_dim;
    std::fill(mean, mean + head_dim, 0.0f);
    for (int h = 0; h < heads; ++h)
      for (int d = 0; d < head_dim; ++d) mean[d] += last[h * head_dim + d] / heads;
    bool full = !state.has_query[sequence] || state.steps_since_refresh[sequence] + 1 >= settings.refresh_stride;
    if (!full && settings.query_similarity_threshold > 0.0f) {
      const float* previous = state.query + int64_t(sequence) * head_dim;
      double dot = 0, na = 0, nb = 0;
      for (int d = 0; d < head_dim; ++d) {
        dot += double(mean[d]) * previous[d];
        na += double(mean[d]) * mean[d];
        nb += double(previous[d]) * previous[d];
      }
      full = dot / std::sqrt(std::max(na * nb, 1e-30)) < settings.query_similarity_threshold;
    }
    state.full_step[sequence] = full;
  }
}

void refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                    const StepTargets& targets, const RefreshSettings& settings, const float* dense_probabilities,
                    const float* coded_probabilities) {
  const int radius = settings.pool_kernel / 2;
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    if (!state.full_step[sequence]) {
      ++state.steps_since_refresh[sequence];
      continue;
    }
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      struct Entry {
        int32_t position;
        float probability;
        uint8_t* selected;
      };
      std::vector<Entry> entries;
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot)
        entries.push_back({layer.dense_positions[slot], dense_probabilities[slot], layer.dense_selected + slot});
      if (layer.coded_count != nullptr)
        for (int64_t slot = layer.coded_begin[head]; slot < layer.coded_begin[head] + layer.coded_count[head]; ++slot)
          entries.push_back({layer.coded_positions[slot], coded_probabilities[slot], layer.coded_selected + slot});
      std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.position < b.position; });
      const int n = int(entries.size());
      std::vector<float> pooled(n);
      for (int i = 0; i < n; ++i) {
        pooled[i] = entries[i].probability;
        for (int k = i - 1; k >= 0 && entries[i].position - entries[k].position <= radius; --k)
          pooled[i] = std::max(pooled[i], entries[k].probability);
        for (int k = i + 1; k < n && entries[k].position - entries[i].position <= radius; ++k)
          pooled[i] = std::max(pooled[i], entries[k].probability);
      }
      std::vector<int> order(n);
      std::iota(order.begin(), order.end(), 0);
      const int keep = std::min(n, int(targets.selected[int64_t(j) * layer.kv_heads + h]));
      // Entries are in position order, so a higher index is the newer position.
      std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                        [&](int a, int b) { return pooled[a] != pooled[b] ? pooled[a] > pooled[b] : a > b; });
      for (const Entry& entry : entries) *entry.selected = 0;
      for (int i = 0; i < keep; ++i) *entries[order[i]].selected = 1;
    }
    state.refresh_position[sequence] = StepLength(step, j);
    state.steps_since_refresh[sequence] = 0;
    state.has_query[sequence] = 1;
    std::copy_n(state.step_query + int64_t(sequence) * layer.head_dim, layer.head_dim,
                state.query + int64_t(sequence) * layer.head_dim);
  }
}

}  // namespace kvplan::cpu
