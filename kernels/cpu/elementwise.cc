#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <vector>

#include "base/number_formats.h"
#include "kernels/compressed_layout.h"

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

void fill_noise_bf16(uint16_t* out, int64_t n, uint32_t seed) {
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16(2.0f * NoiseValue(NoiseBits(seed, i)));
}

void add_row_bias(float* x, const float* bias, int64_t rows, int dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < dim; ++i) x[r * dim + i] += bias[i];
}

void swiglu(const float* gate_up, int64_t rows, int ffn, float* out) {
#pragma omp parallel for if (rows * ffn > 65536)
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < ffn; ++i) {
      const float gate = gate_up[r * 2 * ffn + i], up = gate_up[r * 2 * ffn + ffn + i];
      out[r * ffn + i] = gate / (1.0f + std::exp(-gate)) * up;
    }
}

}  // namespace kvplan::cpu
