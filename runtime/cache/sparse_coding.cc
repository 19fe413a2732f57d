#include "runtime/cache/sparse_coding.h"

#include <cblas.h>

#include <cmath>

#include "kernels/cpu/compressed/coding.h"

namespace kvplan {

SparseCodes MatchingPursuit(const float* dictionary, int atoms, int dim, const float* x, int64_t n, int sparsity) {
  SparseCodes codes;
  codes.indices.resize(n * sparsity);
  codes.coefficients.resize(n * sparsity);
  // Row blocks are coded in parallel, each with a single-threaded GEMM: the runtime codes a few hundred
  // vectors at a time, too few for BLAS's own threading to pay.
  constexpr int64_t kBlock = 32;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel
  {
    std::vector<float> residual(kBlock * dim), correlation(kBlock * atoms);
#pragma omp for schedule(dynamic)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t begin = block * kBlock, rows = std::min(kBlock, n - begin);
      std::copy(x + begin * dim, x + (begin + rows) * dim, residual.begin());
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
  }
  return codes;
}

}  // namespace kvplan
