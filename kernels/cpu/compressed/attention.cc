#include "kernels/cpu/compressed/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "base/number_formats.h"
#include "kernels/cpu/compressed/common.h"

namespace kvplan::cpu {

void compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                          const RefreshStateView* refresh, const CompressedAttentionParams& params, const float* q,
                          float* out, float* dense_probabilities, float* coded_probabilities) {
  const int hd = layer.head_dim, group = params.heads / layer.kv_heads;
  const bool want_probabilities = dense_probabilities != nullptr;
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    const int row_begin = step.row_begin[j], rows = step.row_begin[j + 1] - row_begin;
    const bool subset = refresh != nullptr && !refresh->full_step[sequence];
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      const int coded = layer.coded_count ? layer.coded_count[head] : 0, dense = layer.dense_count[head];
      const bool merged = layer.merged_tokens != nullptr && layer.merged_tokens[head] > 0.0f;
      const int entries = coded + dense + (merged ? 1 : 0);
      // This head's keys (after RoPE) and values, materialised once for every row and group head.
      std::vector<float> keys(int64_t(entries) * hd), values(int64_t(entries) * hd), bias(entries, 0.0f);
      std::vector<int32_t> positions(entries);
      std::vector<uint8_t> in_view(entries, 1);
#pragma omp parallel for if (coded > 64)
      for (int e = 0; e < coded; ++e) {
        const int64_t slot = layer.coded_begin[head] + e;
        DecodeCodedEntry(layer, *tables, h, slot, keys.data() + int64_t(e) * hd, values.data() + int64_t(e) * hd);
        positions[e] = layer.coded_positions[slot];
        if (subset) in_view[e] = layer.coded_selected[slot] || positions[e] >= refresh->refresh_position[sequence];
      }
      for (int e = 0; e < dense; ++e) {
        const int64_t slot = layer.dense_begin[head] + e, target = coded + e;
        for (int d = 0; d < hd; ++d) {
          keys[target * hd + d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
          values[target * hd + d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
        }
        positions[target] = layer.dense_positions[slot];
        if (subset)
          in_view[target] = layer.dense_selected[slot] || positions[target] >= refresh->refresh_position[sequence];
      }
      if (merged) {
        const int target = entries - 1;
        std::copy_n(layer.merged_keys + head * hd, hd, keys.data() + int64_t(target) * hd);
        std::copy_n(layer.merged_values + head * hd, hd, values.data() + int64_t(target) * hd);
        positions[target] = std::numeric_limits<int32_t>::min();  // seen by every row
        bias[target] = params.merge_compensation * std::log(layer.merged_tokens[head]);
      }
      std::vector<float> row_probabilities(want_probabilities ? int64_t(rows) * group * entries : 0, 0.0f);
#pragma omp parallel for collapse(2) schedule(dynamic)
      for (int t = 0; t < rows; ++t) {
        for (int g = 0; g < group; ++g) {
          const int row = row_begin + t, query_head = h * group + g;
          const float* query = q + (int64_t(row) * params.heads + query_head) * hd;
          float* result = out + (int64_t(row) * params.heads + query_head) * hd;
          const int32_t query_position = step.row_position[row];
          std::vector<float> weights(entries, 0.0f);
          std::vector<uint8_t> seen(entries, 0);
          float max_logit = -std::numeric_limits<float>::infinity();
          for (int e = 0; e < entries; ++e) {
            if (!in_view[e] || positions[e] > query_position) continue;
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot += query[d] * keys[int64_t(e) * hd + d];
            weights[e] = dot * params.scale + bias[e];
            seen[e] = 1;
            max_logit = std::max(max_logit, weights[e]);
          }
          std::fill(result, result + hd, 0.0f);
          if (max_logit == -std::numeric_limits<float>::infinity()) continue;
          double denominator = 0.0;
          for (int e = 0; e < entries; ++e) {
            if (!seen[e]) continue;
            weights[e] = std::exp(weights[e] - max_logit);
            denominator += weights[e];
            for (int d = 0; d < hd; ++d) result[d] += weights[e] * values[int64_t(e) * hd + d];
          }
          for (int d = 0; d < hd; ++d) result[d] = float(result[d] / denominator);
          if (want_probabilities)
            for (int e = 0; e < entries; ++e)
              if (seen[e]) row_probabilities[(int64_t(t) * group + g) * entries + e] = float(weights[e] / denominator);
        }
      }
      if (!want_probabilities) continue;
      for (int e = 0; e < coded + dense; ++e) {
        float probability = 0.0f;
        for (int64_t row_group = 0; row_group < int64_t(rows) * group; ++row_group)
          probability = std::max(probability, row_probabilities[row_group * entries + e]);
        if (e < coded)
          coded_probabilities[layer.coded_begin[head] + e] = probability;
        else
          dense_probabilities[layer.dense_begin[head] + e - coded] = probability;
      }
    }
  }
}

}  // namespace kvplan::cpu
