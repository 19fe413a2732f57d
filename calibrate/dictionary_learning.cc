#include "calibrate/dictionary_learning.h"

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu/compressed/pursuit.h"
#include "kernels/cpu/dictionary_training.h"
#include "runtime/cache/sparse_coding.h"

namespace kvplan {
namespace {

constexpr float kHeldBackFraction = 0.1f;  // dictionary vectors kept out of training to measure error

// x - the decoded codes, per vector; x: [n, dim].
std::vector<float> Residuals(const std::vector<float>& dictionary, int dim, const float* x, int64_t n,
                             const SparseCodes& codes, int sparsity) {
  std::vector<float> residuals(n * dim), reconstruction(dim);
  for (int64_t i = 0; i < n; ++i) {
    cpu::decode_sparse(dictionary.data(), dim, codes.indices.data() + i * sparsity,
                       codes.coefficients.data() + i * sparsity, sparsity, reconstruction.data());
    for (int d = 0; d < dim; ++d) residuals[i * dim + d] = x[i * dim + d] - reconstruction[d];
  }
  return residuals;
}

}  // namespace

void NormaliseAtoms(std::vector<float>& dictionary, int dim) {
  cpu::normalise_atoms(dictionary.data(), int(dictionary.size() / dim), dim);
}

DictionaryTrainingSplit SplitDictionarySamples(int64_t vectors, int atoms) {
  DictionaryTrainingSplit split;
  split.held_back = std::max<int64_t>(1, int64_t(vectors * kHeldBackFraction));
  split.training = vectors - split.held_back;
  split.atoms = int(std::min<int64_t>(atoms, split.training));
  return split;
}

plan::Dictionary FinishDictionary(const std::vector<float>& dictionary, int dim, const float* held_back,
                                  const float* residuals, int64_t held_back_vectors) {
  double error = 0, norm = 0;
  for (int64_t i = 0; i < held_back_vectors * dim; ++i) {
    error += double(residuals[i]) * residuals[i];
    norm += double(held_back[i]) * held_back[i];
  }
  plan::Dictionary result;
  result.set_atoms(int(dictionary.size() / dim));
  result.set_dim(dim);
  result.mutable_values()->Assign(dictionary.begin(), dictionary.end());
  result.set_relative_error(float(std::sqrt(error / std::max(norm, 1e-30))));
  return result;
}

// Dictionary learning: FAISS k-means initialisation, then alternating matching-pursuit coding and a
// per-atom preconditioned gradient step on the reconstruction error (each atom moves toward the residual it
// explains, scaled by its squared coefficients), renormalised to unit length.
plan::Dictionary LearnDictionary(const std::vector<float>& samples, int dim, int atoms, int sparsity, int epochs) {
  const DictionaryTrainingSplit split = SplitDictionarySamples(int64_t(samples.size()) / dim, atoms);
  const int64_t n = split.training;
  const float* train = samples.data();
  const float* test = samples.data() + n * dim;
  std::vector<float> dictionary(int64_t(split.atoms) * dim);
  {
    // faiss::kmeans_clustering's defaults, without its stderr chatter: a warning whenever a layer has fewer
    // than 39 samples per atom (calibration often does, by design) and progress lines on large problems.
    faiss::ClusteringParameters parameters;
    parameters.verbose = false;
    parameters.min_points_per_centroid = 1;
    faiss::Clustering clustering(dim, split.atoms, parameters);
    faiss::IndexFlatL2 index(dim);
    clustering.train(n, train, index);
    std::copy(clustering.centroids.begin(), clustering.centroids.end(), dictionary.begin());
  }
  NormaliseAtoms(dictionary, dim);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const SparseCodes codes = MatchingPursuit(dictionary.data(), split.atoms, dim, train, n, sparsity);
    const std::vector<float> residuals = Residuals(dictionary, dim, train, n, codes, sparsity);
    cpu::update_atoms(residuals.data(), n, codes.indices.data(), codes.coefficients.data(), sparsity, split.atoms, dim,
                      dictionary.data());
    NormaliseAtoms(dictionary, dim);
  }
  const SparseCodes codes = MatchingPursuit(dictionary.data(), split.atoms, dim, test, split.held_back, sparsity);
  const std::vector<float> residuals = Residuals(dictionary, dim, test, split.held_back, codes, sparsity);
  return FinishDictionary(dictionary, dim, test, residuals.data(), split.held_back);
}

}  // namespace kvplan
