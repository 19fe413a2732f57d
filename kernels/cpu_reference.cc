#include "kernels/cpu_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvplan::cpu {

void rms_norm(const float* x, const float* weight, int64_t rows, int dim, float eps, float* out) {
#pragma omp parallel for if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double sum_squares = 0.0;
    for (int i = 0; i < dim; ++i) sum_squares += double(row[i]) * row[i];
    const float inv_rms = 1.0f / std::sqrt(float(sum_squares / dim) + eps);
    for (int i = 0; i < dim; ++i) out[r * dim + i] = row[i] * inv_rms * weight[i];
  }
}

void apply_rope(float* x, const int32_t* positions, const float* inv_freq, int tokens, int heads, int head_dim,
                float attention_factor) {
  const int half = head_dim / 2;
#pragma omp parallel for if (tokens > 16)
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> cos_table(half), sin_table(half);
    for (int i = 0; i < half; ++i) {
      // double keeps the angle exact at long positions; fp32 loses ~1e-3 rad by position 32K.
      const double angle = double(positions[t]) * inv_freq[i];
      cos_table[i] = float(std::cos(angle)) * attention_factor;
      sin_table[i] = float(std::sin(angle)) * attention_factor;
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (int64_t(t) * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_table[i] - b * sin_table[i];
        v[i + half] = b * cos_table[i] + a * sin_table[i];
      }
    }
  }
}

void add_row_bias(float* x, const float* bias, int64_t rows, int dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < dim; ++i) x[r * dim + i] += bias[i];
}

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

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
        logits[j] = dot * scale + (cache.logit_bias ? cache.logit_bias[j] : 0.0f);
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
