#include "kernels/cpu/compressed/eviction.h"

#include <algorithm>
#include <vector>

#include "base/number_formats.h"
#include "kernels/cpu/compressed/common.h"

namespace kvplan::cpu {

void evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
           const StepTargets& targets, const EvictionSettings& settings) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j) {
    const int32_t length = StepLength(step, j);
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      const int dense = layer.dense_count[head], coded = layer.coded_count ? layer.coded_count[head] : 0;
      int excess = dense + coded - targets.kept[int64_t(j) * layer.kv_heads + h];
      if (excess <= 0) continue;
      struct Candidate {
        bool coded;
        int index;  // in the head's region
        int32_t position;
        float score;
      };
      std::vector<Candidate> candidates;
      const int32_t protected_from = length - settings.protected_recent;
      auto consider = [&](bool is_coded, int index, int32_t position, float score) {
        if (position >= settings.sink_tokens && position < protected_from)
          candidates.push_back({is_coded, index, position, score});
      };
      for (int e = 0; e < coded; ++e) {
        const int64_t slot = layer.coded_begin[head] + e;
        consider(true, e, layer.coded_positions[slot], layer.coded_scores[slot]);
      }
      for (int e = 0; e < dense; ++e) {
        const int64_t slot = layer.dense_begin[head] + e;
        consider(false, e, layer.dense_positions[slot], layer.dense_scores[slot]);
      }
      excess = std::min(excess, int(candidates.size()));
      std::partial_sort(candidates.begin(), candidates.begin() + excess, candidates.end(),
                        [&](const Candidate& a, const Candidate& b) {
                          if (a.score != b.score)
                            return settings.keep_low_key_norms ? a.score > b.score : a.score < b.score;
                          return a.position < b.position;
                        });
      candidates.resize(excess);
      if (settings.merge_evicted) {
        std::sort(candidates.begin(), candidates.end(),
                  [](const Candidate& a, const Candidate& b) { return a.position < b.position; });
        std::vector<float> key(hd), value(hd);
        for (const Candidate& victim : candidates) {
          if (victim.coded) {
            DecodeCodedEntry(layer, *tables, h, layer.coded_begin[head] + victim.index, key.data(), value.data());
          } else {
            const int64_t slot = layer.dense_begin[head] + victim.index;
            for (int d = 0; d < hd; ++d) {
              key[d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
              value[d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
            }
          }
          merge_into_slot(key.data(), value.data(), 1, hd, layer.merged_keys + head * hd,
                          layer.merged_values + head * hd, layer.merged_tokens + head);
        }
      }
      std::vector<uint8_t> dense_removed(dense, 0), coded_removed(coded, 0);
      for (const Candidate& victim : candidates) (victim.coded ? coded_removed : dense_removed)[victim.index] = 1;
      CompactRegion(dense_removed, layer.dense_begin[head], layer.dense_count + head,
                    [&](int64_t from, int64_t to) { MoveDenseSlot(layer, from, to); });
      if (coded > 0)
        CompactRegion(coded_removed, layer.coded_begin[head], layer.coded_count + head,
                      [&](int64_t from, int64_t to) { MoveCodedSlot(layer, from, to); });
    }
  }
}

void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens) {
  // An empty slot's means are whatever a reset left there (never read): the first token starts them afresh.
  if (count > 0 && *slot_tokens == 0.0f) {
    std::fill_n(slot_key, head_dim, 0.0f);
    std::fill_n(slot_value, head_dim, 0.0f);
  }
  for (int i = 0; i < count; ++i) {
    const float tokens = *slot_tokens + 1.0f;
    for (int d = 0; d < head_dim; ++d) {
      slot_key[d] += (keys[int64_t(i) * head_dim + d] - slot_key[d]) / tokens;
      slot_value[d] += (values[int64_t(i) * head_dim + d] - slot_value[d]) / tokens;
    }
    *slot_tokens = tokens;
  }
}

}  // namespace kvplan::cpu
