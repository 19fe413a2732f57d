// CSR dictionaries: learned from sampled key or value head vectors, so that matching pursuit codes a vector with a
// few atoms.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// Scales every atom ([atoms, dim] rows) to unit length; a dead atom becomes a basis vector.
void NormaliseAtoms(std::vector<float>& dictionary, int dim);

// Learns `atoms` unit atoms from samples ([n, dim]); the last tenth is held back to measure the relative
// reconstruction error the dictionary reports.
plan::Dictionary LearnDictionary(const std::vector<float>& samples, int dim, int atoms, int sparsity, int epochs);

// The same training on the GPU (calibrate/cuda/dictionary_learning_cuda.cc), with k-means by Lloyd iterations of
// its own (FAISS's count and seed, not its random stream), so the dictionary differs from LearnDictionary's but
// its error matches within a few percent. FailedPrecondition in a build without CUDA or without a device.
absl::StatusOr<plan::Dictionary> LearnDictionaryOnDevice(const std::vector<float>& samples, int dim, int atoms,
                                                         int sparsity, int epochs);

// What both trainers share: the split of the samples (the first `training` vectors train, the last `held_back`
// measure the error) and the atom count, clamped to the training vectors.
struct DictionaryTrainingSplit {
  int64_t training = 0;
  int64_t held_back = 0;
  int atoms = 0;
};
DictionaryTrainingSplit SplitDictionarySamples(int64_t vectors, int atoms);

// The trained dictionary ([atoms, dim]) as the plan stores it, with the relative error
// sqrt(sum |residual|^2 / sum |x|^2) of the held-back vectors x and their residuals after coding ([held_back, dim]).
plan::Dictionary FinishDictionary(const std::vector<float>& dictionary, int dim, const float* held_back,
                                  const float* residuals, int64_t held_back_vectors);

}  // namespace kvplan
