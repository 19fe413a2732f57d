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

float round_to_fp16(float value) {
  if (!std::isfinite(value)) return value;
  const float magnitude = std::fabs(value);
  if (magnitude >= 65504.0f) return std::copysign(65504.0f, value);
  if (magnitude < 6.103515625e-05f) return std::nearbyint(value * 16777216.0f) / 16777216.0f;  // subnormal step
  int exponent;
  std::frexp(magnitude, &exponent);
  const float step = std::ldexp(1.0f, exponent - 11);  // 10 explicit mantissa bits
  return std::nearbyint(value / step) * step;
}

void matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int sparsity, uint16_t* indices,
                      float* coefficients) {
  std::vector<float> residual(x, x + dim);
  for (int s = 0; s < sparsity; ++s) {
    int best = 0;
    float best_correlation = 0.0f;
    for (int a = 0; a < atoms; ++a) {
      const float* atom = dictionary + int64_t(a) * dim;
      float correlation = 0.0f;
      for (int d = 0; d < dim; ++d) correlation += residual[d] * atom[d];
      if (std::fabs(correlation) > std::fabs(best_correlation)) {
        best = a;
        best_correlation = correlation;
      }
    }
    const float coefficient = round_to_fp16(best_correlation);
    indices[s] = uint16_t(best);
    coefficients[s] = coefficient;
    const float* atom = dictionary + int64_t(best) * dim;
    for (int d = 0; d < dim; ++d) residual[d] -= coefficient * atom[d];
  }
}

void decode_sparse(const float* dictionary, int dim, const uint16_t* indices, const float* coefficients, int sparsity,
                   float* out) {
  std::fill(out, out + dim, 0.0f);
  for (int s = 0; s < sparsity; ++s) {
    const float* atom = dictionary + int64_t(indices[s]) * dim;
    for (int d = 0; d < dim; ++d) out[d] += coefficients[s] * atom[d];
  }
}

void sparse_attention(const SparseAttentionParams& p, const float* q, const int32_t* query_positions,
                      const CodedHeadView* kv, float* out, float* max_probabilities) {
  const int hd = p.head_dim, group = p.heads / p.kv_heads;
  int64_t probability_offset = 0;
  for (int h = 0; h < p.kv_heads; ++h) {
    const CodedHeadView& head = kv[h];
    const int entries = head.coded_length + head.dense.length;
    // Materialise this head's keys (rotated) and values once; every query row of the group reuses them.
    std::vector<float> keys(int64_t(entries) * hd), values(int64_t(entries) * hd);
    std::vector<int32_t> positions(entries);
    std::vector<float> bias(entries, 0.0f);
#pragma omp parallel for
    for (int e = 0; e < head.coded_length; ++e) {
      float* key = keys.data() + int64_t(e) * hd;
      decode_sparse(p.key_dictionary, hd, head.key_atoms + int64_t(e) * p.key_sparsity,
                    head.key_coefficients + int64_t(e) * p.key_sparsity, p.key_sparsity, key);
      apply_rope(key, head.coded_positions + e, p.inv_freq, 1, 1, hd, p.rope_attention_factor);
      decode_sparse(p.value_dictionary, hd, head.value_atoms + int64_t(e) * p.value_sparsity,
                    head.value_coefficients + int64_t(e) * p.value_sparsity, p.value_sparsity,
                    values.data() + int64_t(e) * hd);
      positions[e] = head.coded_positions[e];
    }
    for (int e = 0; e < head.dense.length; ++e) {
      const int target = head.coded_length + e;
      std::copy_n(head.dense.keys + int64_t(e) * hd, hd, keys.data() + int64_t(target) * hd);
      std::copy_n(head.dense.values + int64_t(e) * hd, hd, values.data() + int64_t(target) * hd);
      positions[target] = head.dense.positions[e];
      if (head.dense.logit_bias != nullptr) bias[target] = head.dense.logit_bias[e];
    }
    float* probabilities = max_probabilities ? max_probabilities + probability_offset : nullptr;
    if (probabilities != nullptr) std::fill(probabilities, probabilities + entries, 0.0f);
    probability_offset += entries;
    // Probabilities per query row and group head, maxed after the parallel loop.
    std::vector<float> row_probabilities(probabilities != nullptr ? int64_t(p.tokens) * group * entries : 0, 0.0f);
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < p.tokens; ++t) {
      for (int g = 0; g < group; ++g) {
        std::vector<float> logits(entries);
        const int query_head = h * group + g;
        const float* query = q + (int64_t(t) * p.heads + query_head) * hd;
        float* result = out + (int64_t(t) * p.heads + query_head) * hd;
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int e = 0; e < entries; ++e) {
          if (positions[e] > query_positions[t]) {
            logits[e] = -std::numeric_limits<float>::infinity();
            continue;
          }
          float dot = 0.0f;
          for (int d = 0; d < hd; ++d) dot += query[d] * keys[int64_t(e) * hd + d];
          logits[e] = dot * p.scale + bias[e];
          max_logit = std::max(max_logit, logits[e]);
        }
        std::fill(result, result + hd, 0.0f);
        if (max_logit == -std::numeric_limits<float>::infinity()) continue;
        double denominator = 0.0;
        for (int e = 0; e < entries; ++e) {
          if (logits[e] == -std::numeric_limits<float>::infinity()) continue;
          logits[e] = std::exp(logits[e] - max_logit);
          denominator += logits[e];
          for (int d = 0; d < hd; ++d) result[d] += logits[e] * values[int64_t(e) * hd + d];
        }
        for (int d = 0; d < hd; ++d) result[d] = float(result[d] / denominator);
        if (probabilities != nullptr)
          for (int e = 0; e < entries; ++e)
            if (positions[e] <= query_positions[t])
              row_probabilities[(int64_t(t) * group + g) * entries + e] = float(logits[e] / denominator);
      }
    }
    if (probabilities != nullptr)
      for (int64_t row_group = 0; row_group < int64_t(p.tokens) * group; ++row_group)
        for (int e = 0; e < entries; ++e)
          probabilities[e] = std::max(probabilities[e], row_probabilities[row_group * entries + e]);
  }
}

void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int d = 0; d < head_dim; ++d) sum += double(keys[i * head_dim + d]) * keys[i * head_dim + d];
    norms[i] = float(std::sqrt(sum));
  }
}

void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens) {
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
