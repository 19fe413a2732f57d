#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvplan::cpu {

void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out) {
  const int group = heads / kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const KvHeadView& cache = kv[h / group];
      const float* query = q + (int64_t(t) * heads + h) * head_dim;
      float* result = out + (int64_t(t) * heads + h) * head_dim;
      const int32_t query_position = query_positions[t];
      std::vector<float> logits(cache.length);
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < cache.length; ++j) {
        const int32_t distance = query_position - cache.positions[j];
        if (distance < 0 || (sliding_window > 0 && distance >= sliding_window)) {
          logits[j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float* key = cache.keys + int64_t(j) * head_dim;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot += query[d] * key[d];
        logits[j] = dot * scale;
        max_logit = std::max(max_logit, logits[j]);
      }
      std::fill(result, result + head_dim, 0.0f);
      if (max_logit == -std::numeric_limits<float>::infinity()) continue;
      double denominator = 0.0;
      for (int j = 0; j < cache.length; ++j) {
        if (logits[j] == -std::numeric_limits<float>::infinity()) continue;
        const float weight = std::exp(logits[j] - max_logit);
        denominator += weight;
        const float* value = cache.values + int64_t(j) * head_dim;
        for (int d = 0; d < head_dim; ++d) result[d] += weight * value[d];
      }
      const float inv = float(1.0 / denominator);
      for (int d = 0; d < head_dim; ++d) result[d] *= inv;
    }
  }
}

}  // namespace kvplan::cpu
