#include "kernels/cpu/calibration_statistics.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

namespace kvplan::cpu {

void attention_coverage(const float* q, const float* k, int rows, int heads, int kv_heads, int head_dim,
                        int first_query, float mass, float* out) {
  const int group = heads / kv_heads, queries = rows - first_query;
  const float scale = 1.0f / std::sqrt(float(head_dim));
#pragma omp parallel
  {
    std::vector<float> probabilities(rows);
#pragma omp for collapse(2) schedule(dynamic)
    for (int i = 0; i < queries; ++i)
      for (int h = 0; h < heads; ++h) {
        const int t = first_query + i;
        const float* query = q + (int64_t(t) * heads + h) * head_dim;
        float max_logit = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          const float* key = k + (int64_t(j) * kv_heads + h / group) * head_dim;
          float dot = 0;
          for (int d = 0; d < head_dim; ++d) dot += query[d] * key[d];
          probabilities[j] = dot * scale;
          max_logit = std::max(max_logit, probabilities[j]);
        }
        double total = 0;
        for (int j = 0; j <= t; ++j) total += probabilities[j] = std::exp(probabilities[j] - max_logit);
        std::sort(probabilities.begin(), probabilities.begin() + t + 1, std::greater<>());
        double held = 0;
        int needed = 0;
        while (needed <= t && held < mass * total) held += probabilities[needed++];
        out[int64_t(i) * heads + h] = float(needed) / float(t + 1);
      }
  }
}

void add_column_sums(const float* x, int rows, int cols, double* sums) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) sums[c] += x[int64_t(r) * cols + c];
}

void gather_rows(const float* x, const int32_t* indices, int count, int dim, float* out) {
  for (int i = 0; i < count; ++i) std::copy_n(x + int64_t(indices[i]) * dim, dim, out + int64_t(i) * dim);
}

}  // namespace kvplan::cpu
