#include "calibrate/dictionary_learning.h"

#include <faiss/Clustering.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu_reference.h"
#include "runtime/cache/sparse_coding.h"

namespace kvplan {
namespace {

constexpr float kHeldBackFraction = 0.1f;  // dictionary vectors kept out of training to measure error

}  // namespace

void NormaliseAtoms(std::vector<float>& dictionary, int dim) {
  const int64_t atoms = int64_t(dictionary.size()) / dim;
  for (int64_t a = 0; a < atoms; ++a) {
    float* atom = dictionary.data() + a * dim;
    double norm = 0;
    for (int d = 0; d < dim; ++d) norm += double(atom[d]) * atom[d];
    const float inverse = norm > 1e-20 ? float(1.0 / std::sqrt(norm)) : 0.0f;
    for (int d = 0; d < dim; ++d) atom[d] *= inverse;
    if (inverse == 0.0f) atom[a % dim] = 1.0f;
  }
}

// Dictionary learning: FAISS k-means initialisation, then alternating matching-pursuit coding and a
// per-atom preconditioned gradient step on the reconstruction error (each atom moves toward the residual it
// explains, scaled by its squared coefficients), renormalised to unit length.
plan::Dictionary LearnDictionary(const std::vector<float>& samples, int dim, int atoms, int sparsity, int epochs) {
  const int64_t total = int64_t(samples.size()) / dim;
  const int64_t held_back = std::max<int64_t>(1, int64_t(total * kHeldBackFraction));
  const int64_t n = total - held_back;
  const float* train = samples.data();
  const float* test = samples.data() + n * dim;
  atoms = int(std::min<int64_t>(atoms, n));
  std::vector<float> dictionary(int64_t(atoms) * dim);
  faiss::kmeans_clustering(dim, n, atoms, train, dictionary.data());
  NormaliseAtoms(dictionary, dim);
  std::vector<float> residual(n * dim), reconstruction(dim);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const SparseCodes codes = MatchingPursuit(dictionary.data(), atoms, dim, train, n, sparsity);
    std::vector<double> step(int64_t(atoms) * dim, 0.0), weight(atoms, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      cpu::decode_sparse(dictionary.data(), dim, codes.indices.data() + i * sparsity,
                         codes.coefficients.data() + i * sparsity, sparsity, reconstruction.data());
      for (int s = 0; s < sparsity; ++s) {
        const int a = codes.indices[i * sparsity + s];
        const float c = codes.coefficients[i * sparsity + s];
        weight[a] += double(c) * c;
        for (int d = 0; d < dim; ++d) step[int64_t(a) * dim + d] += c * (train[i * dim + d] - reconstruction[d]);
      }
    }
    for (int a = 0; a < atoms; ++a)
      if (weight[a] > 0)
        for (int d = 0; d < dim; ++d) dictionary[int64_t(a) * dim + d] += float(step[int64_t(a) * dim + d] / weight[a]);
    NormaliseAtoms(dictionary, dim);
  }
  const SparseCodes codes = MatchingPursuit(dictionary.data(), atoms, dim, test, held_back, sparsity);
  double error = 0, norm = 0;
  for (int64_t i = 0; i < held_back; ++i) {
    cpu::decode_sparse(dictionary.data(), dim, codes.indices.data() + i * sparsity,
                       codes.coefficients.data() + i * sparsity, sparsity, reconstruction.data());
    for (int d = 0; d < dim; ++d) {
      error += double(test[i * dim + d] - reconstruction[d]) * (test[i * dim + d] - reconstruction[d]);
      norm += double(test[i * dim + d]) * test[i * dim + d];
    }
  }
  plan::Dictionary result;
  result.set_atoms(atoms);
  result.set_dim(dim);
  result.mutable_values()->Assign(dictionary.begin(), dictionary.end());
  result.set_relative_error(float(std::sqrt(error / std::max(norm, 1e-30))));
  return result;
}

}  // namespace kvplan
