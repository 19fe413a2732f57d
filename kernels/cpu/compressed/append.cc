#include "kernels/cpu/compressed/append.h"

#include <cmath>

#include "base/number_formats.h"
#include "kernels/cpu/compressed/common.h"

namespace kvplan::cpu {

void compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys, const float* values,
                       const float* key_norms) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      for (int r = step.row_begin[j]; r < step.row_begin[j + 1]; ++r) {
        const int64_t slot = layer.dense_begin[head] + layer.dense_count[head]++;
        RequireSlot(slot < layer.dense_begin[head + 1]);
        const int64_t source = (int64_t(r) * layer.kv_heads + h) * hd;
        for (int d = 0; d < hd; ++d) {
          layer.dense_keys[slot * hd + d] = FloatToBf16(keys[source + d]);
          layer.dense_values[slot * hd + d] = FloatToBf16(values[source + d]);
        }
        layer.dense_positions[slot] = step.row_position[r];
        if (layer.dense_scores)
          layer.dense_scores[slot] = key_norms ? key_norms[int64_t(r) * layer.kv_heads + h] : 0.0f;
        if (layer.dense_selected) layer.dense_selected[slot] = 0;
      }
    }
}

void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int d = 0; d < head_dim; ++d) sum += double(keys[i * head_dim + d]) * keys[i * head_dim + d];
    norms[i] = float(std::sqrt(sum));
  }
}

}  // namespace kvplan::cpu
