// Batched matching pursuit over a dictionary, with BLAS doing the correlations. The runtime codes tokens
// leaving the recent window with it; calibration codes training vectors with it. cpu::matching_pursuit
// (kernels/cpu/compressed/pursuit.h) is the one-vector reference it must agree with.
#pragma once

#include <cstdint>
#include <vector>

namespace kvplan {

struct SparseCodes {
  std::vector<uint16_t> indices;    // [n, sparsity]
  std::vector<float> coefficients;  // [n, sparsity], fp16-representable
};

// x: [n, dim]; dictionary: [atoms, dim] with unit-norm rows.
SparseCodes MatchingPursuit(const float* dictionary, int atoms, int dim, const float* x, int64_t n, int sparsity);

}  // namespace kvplan
