#include "runtime/sparse_coding.h"

#include <cblas.h>

#include <cmath>

#include "kernels/cpu_reference.h"

namespace kvplan {

SparseCodes MatchingPursuit(const float* dictionary, int atoms, int dim, const float* x, int64_t n, int sparsity) {
  SparseCodes codes;
  codes.indices.resize(n * sparsity);
  codes.coefficients.resize(n * sparsity);
  constexpr int64_t kBatch = 1024;  // rows per GEMM: bounds the correlation buffer to kBatch x atoms floats
  std::vector<float> residual, correlation(kBatch * atoms);
  for (int64_t begin = 0; begin < n; begin += kBatch) {
    const int64_t rows = std::min(kBatch, n - begin);
    residual.assign(x + begin * dim, x + (begin + rows) * dim);
    for (int s = 0; s < sparsity; ++s) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), atoms, dim, 1.0f, residual.data(), dim,
                  dictionary, dim, 0.0f, correlation.data(), atoms);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = correlation.data() + r * atoms;
        int best = 0;
        for (int a = 1; a < atoms; ++a)
          if (std::fabs(row[a]) > std::fabs(row[best])) best = a;
        const float coefficient = cpu::round_to_fp16(row[best]);
        codes.indices[(begin + r) * sparsity + s] = uint16_t(best);
        codes.coefficients[(begin + r) * sparsity + s] = coefficient;
        const float* atom = dictionary + int64_t(best) * dim;
        float* target = residual.data() + r * dim;
        for (int d = 0; d < dim; ++d) target[d] -= coefficient * atom[d];
      }
    }
  }
  return codes;
}

}  // namespace kvplan
