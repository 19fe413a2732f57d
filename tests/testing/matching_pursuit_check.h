// Checks codes from a matching-pursuit encoder (the GPU kernel, the batched BLAS encoder) against
// cpu::matching_pursuit. Where every choice of the pursuit is clear of float rounding, the encoder must pick
// exactly the reference's atoms, with coefficients at most one fp16 step apart. Where some choice is a near tie,
// either atom is right, so only the code's quality is compared: its residual within 2% of the reference's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/compressed/pursuit.h"
#include "tests/testing/tolerance.h"

namespace kvplan::testing {

// Relative gap between the best and the runner-up |correlation| below which an encoder computing in another
// order may rightly choose the other atom (fp32 dot products of <= 256 terms agree to ~1e-6).
inline constexpr double kClearChoiceMargin = 1e-4;
// One fp16 step (2^-10 relative) when the fp32 projections round to neighbours.
inline constexpr Tolerance kFp16Coefficient{.atol = 1e-6, .rtol = 0x1p-10};

// The smallest relative gap, over the pursuit's steps, between the best and the runner-up |correlation| when x
// ([dim]) is coded along `indices`.
inline double SmallestChoiceMargin(const std::vector<float>& dictionary, int atoms, int dim, const float* x,
                                   const uint16_t* indices, const float* coefficients, int sparsity) {
  std::vector<float> residual(x, x + dim);
  double smallest = 1.0;
  for (int s = 0; s < sparsity; ++s) {
    double best = 0, second = 0;
    for (int a = 0; a < atoms; ++a) {
      double correlation = 0;
      for (int d = 0; d < dim; ++d) correlation += double(dictionary[size_t(a) * dim + d]) * residual[d];
      correlation = std::fabs(correlation);
      second = std::max(second, std::min(best, correlation));
      best = std::max(best, correlation);
    }
    smallest = std::min(smallest, best > 0 ? (best - second) / best : 0.0);
    for (int d = 0; d < dim; ++d) residual[d] -= coefficients[s] * dictionary[size_t(indices[s]) * dim + d];
  }
  return smallest;
}

inline double ResidualNorm(const std::vector<float>& dictionary, int dim, const float* x, const uint16_t* indices,
                           const float* coefficients, int sparsity) {
  std::vector<float> decoded(dim);
  cpu::decode_sparse(dictionary.data(), dim, indices, coefficients, sparsity, decoded.data());
  double norm = 0;
  for (int d = 0; d < dim; ++d) norm += double(x[d] - decoded[d]) * (x[d] - decoded[d]);
  return std::sqrt(norm);
}

// x: [vectors, dim]; indices and coefficients: [vectors, sparsity] from the encoder under test.
inline ::testing::AssertionResult CodesMatchReference(const std::vector<float>& dictionary, int atoms, int dim,
                                                      const std::vector<float>& x, int sparsity,
                                                      const std::vector<uint16_t>& indices,
                                                      const std::vector<float>& coefficients) {
  const int vectors = int(x.size() / dim);
  int near_ties = 0;
  for (int v = 0; v < vectors; ++v) {
    const float* vector = x.data() + size_t(v) * dim;
    std::vector<uint16_t> expected_indices(sparsity);
    std::vector<float> expected_coefficients(sparsity);
    cpu::matching_pursuit(dictionary.data(), atoms, dim, vector, sparsity, expected_indices.data(),
                          expected_coefficients.data());
    const uint16_t* actual_indices = indices.data() + size_t(v) * sparsity;
    const float* actual_coefficients = coefficients.data() + size_t(v) * sparsity;
    if (SmallestChoiceMargin(dictionary, atoms, dim, vector, expected_indices.data(), expected_coefficients.data(),
                             sparsity) > kClearChoiceMargin) {
      if (!std::equal(expected_indices.begin(), expected_indices.end(), actual_indices))
        return ::testing::AssertionFailure() << "vector " << v << ": atoms differ where every choice is clear";
      if (::testing::AssertionResult close =
              AllClose(actual_coefficients, expected_coefficients.data(), sparsity, kFp16Coefficient);
          !close)
        return ::testing::AssertionFailure() << "vector " << v << " coefficients: " << close.message();
      continue;
    }
    ++near_ties;
    const double expected_residual =
        ResidualNorm(dictionary, dim, vector, expected_indices.data(), expected_coefficients.data(), sparsity);
    const double actual_residual = ResidualNorm(dictionary, dim, vector, actual_indices, actual_coefficients, sparsity);
    if (actual_residual > expected_residual * 1.02 + 1e-6)
      return ::testing::AssertionFailure() << "vector " << v << " (a near tie): residual " << actual_residual
                                           << " vs the reference's " << expected_residual;
  }
  // Not a rule for the encoder: a check that the data exercises the exact comparison at all.
  if (near_ties * 10 > vectors)
    return ::testing::AssertionFailure() << near_ties << " of " << vectors
                                         << " vectors are near ties: the test data is too degenerate";
  return ::testing::AssertionSuccess() << near_ties << " near ties of " << vectors;
}

}  // namespace kvplan::testing
