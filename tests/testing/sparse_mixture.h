// Synthetic training vectors for dictionary learning, shaped like attention keys: a shared offset plus a few
// directions of a hidden dictionary with Gaussian weights, plus isotropic noise, so a dictionary of enough atoms
// codes them well and a poor one does not. Seeded: the same arguments give the same vectors.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace kvplan::testing {

struct SparseMixture {
  int hidden_atoms = 512;
  int active = 4;  // hidden directions per vector
  float noise = 0.05f;
  uint32_t seed = 1;
};

inline std::vector<float> SparseMixtureVectors(int64_t n, int dim, const SparseMixture& mixture) {
  std::mt19937 generator(mixture.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, mixture.hidden_atoms - 1);
  std::vector<float> offset(dim), hidden(size_t(mixture.hidden_atoms) * dim);
  for (float& value : offset) value = 2.0f * normal(generator);
  for (float& value : hidden) value = normal(generator) / std::sqrt(float(dim));
  std::vector<float> vectors(size_t(n) * dim);
  for (int64_t i = 0; i < n; ++i) {
    float* vector = vectors.data() + i * dim;
    for (int d = 0; d < dim; ++d) vector[d] = offset[d] + mixture.noise * normal(generator);
    for (int k = 0; k < mixture.active; ++k) {
      const float* direction = hidden.data() + size_t(pick(generator)) * dim;
      const float weight = 3.0f * normal(generator);
      for (int d = 0; d < dim; ++d) vector[d] += weight * direction[d];
    }
  }
  return vectors;
}

}  // namespace kvplan::testing
