#include "kernels/cpu/compressed/pursuit.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "base/number_formats.h"
#include "kernels/compressed_layout.h"
#include "kernels/cpu/compressed/coding.h"

namespace kvplan::cpu {

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

uint32_t pack_code(uint16_t atom, float coefficient) { return PackCode(atom, FloatToFp16(coefficient)); }

}  // namespace kvplan::cpu
