// LearnDictionaryOnDevice: LearnDictionary's algorithm on the GPU. cuBLAS computes every product of vectors with
// centroids or atoms (fp32, no TF32, as the CPU's BLAS does), kernels/cuda/dictionary_training.h the rest. Matching
// pursuit recomputes each step's correlations with one GEMM over all residuals, as the CPU encoder does, rather
// than updating them through the Gram matrix, so the pursuit's choices carry no drift of their own.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "calibrate/dictionary_learning.h"
#include "kernels/cuda/dictionary_training.h"
#include "kernels/cuda/kernels.h"
#include "runtime/cuda/device_memory.h"

namespace kvplan {
namespace {

// FAISS's ClusteringParameters defaults.
constexpr int kKMeansIterations = 25;
constexpr uint32_t kKMeansSeed = 1234;
// FAISS's split_clusters perturbation, which pushes the two halves of a split cluster apart.
constexpr float kSplitPerturbation = 1.0f / 1024;

// FAISS's remedy for empty clusters, made deterministic: each takes over half of the currently largest cluster
// (the lowest index on ties), the two centroids pushed apart symmetrically.
void SplitIntoEmptyClusters(std::vector<int64_t>& sizes, std::vector<float>& centroids, int dim) {
  for (size_t empty = 0; empty < sizes.size(); ++empty) {
    if (sizes[empty] > 0) continue;
    const size_t largest = std::max_element(sizes.begin(), sizes.end()) - sizes.begin();
    for (int d = 0; d < dim; ++d) {
      const float sign = d % 2 == 0 ? 1.0f : -1.0f;
      const float value = centroids[largest * dim + d];
      centroids[empty * dim + d] = value * (1 + sign * kSplitPerturbation);
      centroids[largest * dim + d] = value * (1 - sign * kSplitPerturbation);
    }
    sizes[empty] = sizes[largest] / 2;
    sizes[largest] -= sizes[empty];
  }
}

template <typename T>
absl::Status Download(const T* device, size_t count, std::vector<T>& host) {
  host.resize(count);
  return CudaStatus(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
}

// One training run's handle and buffers; everything runs on the legacy default stream, in order.
class DeviceDictionaryTrainer {
 public:
  DeviceDictionaryTrainer(int dim, int sparsity, const DictionaryTrainingSplit& split)
      : dim_(dim), sparsity_(sparsity), atoms_(split.atoms), split_(split) {}
  DeviceDictionaryTrainer(const DeviceDictionaryTrainer&) = delete;
  DeviceDictionaryTrainer& operator=(const DeviceDictionaryTrainer&) = delete;
  ~DeviceDictionaryTrainer() {
    if (cublas_ != nullptr) cublasDestroy(cublas_);
  }

  absl::Status Allocate(const std::vector<float>& samples) {
    KVPLAN_RETURN_IF_ERROR(CublasStatus(cublasCreate(&cublas_), "cublasCreate"));
    KVPLAN_RETURN_IF_ERROR(CublasStatus(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode"));
    const int64_t rows = split_.training, codes = rows * sparsity_;
    KVPLAN_RETURN_IF_ERROR(samples_.Upload(samples));
    KVPLAN_RETURN_IF_ERROR(dictionary_.Allocate(size_t(atoms_) * dim_ * sizeof(float)));
    KVPLAN_RETURN_IF_ERROR(squared_norms_.Allocate(size_t(atoms_) * sizeof(float)));
    KVPLAN_RETURN_IF_ERROR(products_.Allocate(size_t(rows) * atoms_ * sizeof(float)));
    KVPLAN_RETURN_IF_ERROR(residuals_.Allocate(size_t(rows) * dim_ * sizeof(float)));
    KVPLAN_RETURN_IF_ERROR(assignment_.Allocate(size_t(rows) * sizeof(uint16_t)));
    KVPLAN_RETURN_IF_ERROR(indices_.Allocate(size_t(codes) * sizeof(uint16_t)));
    KVPLAN_RETURN_IF_ERROR(coefficients_.Allocate(size_t(codes) * sizeof(float)));
    KVPLAN_RETURN_IF_ERROR(order_.Allocate(size_t(std::max(rows, codes)) * sizeof(int32_t)));
    KVPLAN_RETURN_IF_ERROR(segment_begin_.Allocate(size_t(atoms_ + 1) * sizeof(int32_t)));
    return workspace_.Allocate(
        std::max(cuda::group_by_key_workspace_bytes(int(rows)), cuda::group_by_key_workspace_bytes(int(codes))));
  }

  // k-means of the training vectors into atoms_ centroids, starting from distinct training vectors in a seeded
  // random order (as FAISS does), then unit atoms.
  absl::Status InitialiseByKMeans(const std::vector<float>& samples) {
    const int64_t rows = split_.training;
    std::vector<int64_t> permutation(rows);
    std::iota(permutation.begin(), permutation.end(), 0);
    std::shuffle(permutation.begin(), permutation.end(), std::mt19937(kKMeansSeed));
    std::vector<float> centroids(size_t(atoms_) * dim_);
    for (int c = 0; c < atoms_; ++c)
      std::copy_n(samples.begin() + permutation[c] * dim_, dim_, centroids.begin() + int64_t(c) * dim_);
    KVPLAN_RETURN_IF_ERROR(UploadDictionary(centroids));
    std::vector<int32_t> segment_begin;
    std::vector<int64_t> sizes(atoms_);
    for (int iteration = 0; iteration < kKMeansIterations; ++iteration) {
      KVPLAN_CUDA(cuda::squared_norms(dictionary_.as<float>(), atoms_, dim_, squared_norms_.as<float>(), nullptr));
      KVPLAN_RETURN_IF_ERROR(ProductsWithDictionary(training(), rows));
      KVPLAN_CUDA(cuda::nearest_centroids(products_.as<float>(), squared_norms_.as<float>(), rows, atoms_,
                                          assignment_.as<uint16_t>(), nullptr));
      KVPLAN_RETURN_IF_ERROR(GroupBy(assignment_.as<uint16_t>(), rows));
      KVPLAN_CUDA(cuda::update_centroids(training(), dim_, order_.as<int32_t>(), segment_begin_.as<int32_t>(), atoms_,
                                         dictionary_.as<float>(), nullptr));
      KVPLAN_RETURN_IF_ERROR(Download(segment_begin_.as<int32_t>(), atoms_ + 1, segment_begin));
      for (int c = 0; c < atoms_; ++c) sizes[c] = segment_begin[c + 1] - segment_begin[c];
      if (std::find(sizes.begin(), sizes.end(), 0) == sizes.end()) continue;
      KVPLAN_RETURN_IF_ERROR(Download(dictionary_.as<float>(), centroids.size(), centroids));
      SplitIntoEmptyClusters(sizes, centroids, dim_);
      KVPLAN_RETURN_IF_ERROR(UploadDictionary(centroids));
    }
    KVPLAN_CUDA(cuda::normalise_atoms(dictionary_.as<float>(), atoms_, dim_, nullptr));
    return absl::OkStatus();
  }

  // Codes x ([rows, dim], rows <= the training vectors) by matching pursuit into indices_ and coefficients_, and
  // leaves its residuals in residuals_.
  absl::Status Pursue(const float* x, int64_t rows) {
    KVPLAN_CUDA(cudaMemcpyAsync(residuals_.as<float>(), x, size_t(rows) * dim_ * sizeof(float),
                                cudaMemcpyDeviceToDevice, nullptr));
    for (int step = 0; step < sparsity_; ++step) {
      KVPLAN_RETURN_IF_ERROR(ProductsWithDictionary(residuals_.as<float>(), rows));
      KVPLAN_CUDA(cuda::pursuit_step(products_.as<float>(), dictionary_.as<float>(), rows, atoms_, dim_, step,
                                     sparsity_, residuals_.as<float>(), indices_.as<uint16_t>(),
                                     coefficients_.as<float>(), nullptr));
    }
    return absl::OkStatus();
  }

  // One epoch: code the training vectors, move each atom toward the residuals it explains, renormalise.
  absl::Status TrainEpoch() {
    KVPLAN_RETURN_IF_ERROR(Pursue(training(), split_.training));
    KVPLAN_RETURN_IF_ERROR(GroupBy(indices_.as<uint16_t>(), split_.training * sparsity_));
    KVPLAN_CUDA(cuda::update_atoms(residuals_.as<float>(), coefficients_.as<float>(), sparsity_, order_.as<int32_t>(),
                                   segment_begin_.as<int32_t>(), atoms_, dim_, dictionary_.as<float>(), nullptr));
    KVPLAN_CUDA(cuda::normalise_atoms(dictionary_.as<float>(), atoms_, dim_, nullptr));
    return absl::OkStatus();
  }

  absl::StatusOr<plan::Dictionary> Finish(const std::vector<float>& samples) {
    KVPLAN_RETURN_IF_ERROR(Pursue(held_back(), split_.held_back));
    std::vector<float> dictionary, residuals;
    KVPLAN_RETURN_IF_ERROR(Download(residuals_.as<float>(), size_t(split_.held_back) * dim_, residuals));
    KVPLAN_RETURN_IF_ERROR(Download(dictionary_.as<float>(), size_t(atoms_) * dim_, dictionary));
    return FinishDictionary(dictionary, dim_, samples.data() + split_.training * dim_, residuals.data(),
                            split_.held_back);
  }

 private:
  const float* training() const { return samples_.as<float>(); }
  const float* held_back() const { return samples_.as<float>() + split_.training * dim_; }

  absl::Status UploadDictionary(const std::vector<float>& values) {
    return CudaStatus(
        cudaMemcpy(dictionary_.as<float>(), values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice),
        "cudaMemcpy");
  }

  // products_[rows, atoms] = x . dictionary^T, which column-major cuBLAS computes as dictionary . x^T.
  absl::Status ProductsWithDictionary(const float* x, int64_t rows) {
    const float one = 1.0f, zero = 0.0f;
    return CublasStatus(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, atoms_, int(rows), dim_, &one,
                                    dictionary_.as<float>(), dim_, x, dim_, &zero, products_.as<float>(), atoms_),
                        "cublasSgemm");
  }

  absl::Status GroupBy(const uint16_t* keys, int64_t entries) {
    return CudaStatus(cuda::group_by_key(keys, int(entries), atoms_, workspace_.as<void>(), workspace_.bytes(),
                                         order_.as<int32_t>(), segment_begin_.as<int32_t>(), nullptr),
                      "cuda::group_by_key");
  }

  const int dim_, sparsity_, atoms_;
  const DictionaryTrainingSplit split_;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer samples_;        // [training + held_back, dim]
  DeviceBuffer dictionary_;     // [atoms, dim]: the centroids, then the atoms
  DeviceBuffer squared_norms_;  // [atoms]
  DeviceBuffer products_;       // [training, atoms]
  DeviceBuffer residuals_;      // [training, dim]
  DeviceBuffer assignment_;     // [training] uint16
  DeviceBuffer indices_;        // [training, sparsity] uint16
  DeviceBuffer coefficients_;   // [training, sparsity]
  DeviceBuffer order_;          // group_by_key's, [max(training, training * sparsity)]
  DeviceBuffer segment_begin_;  // [atoms + 1]
  DeviceBuffer workspace_;
};

}  // namespace

absl::StatusOr<plan::Dictionary> LearnDictionaryOnDevice(const std::vector<float>& samples, int dim, int atoms,
                                                         int sparsity, int epochs) {
  if (!cuda::device_available())
    return absl::FailedPreconditionError("no CUDA device: dictionaries train on the CPU only");
  const DictionaryTrainingSplit split = SplitDictionarySamples(int64_t(samples.size()) / dim, atoms);
  if (split.atoms < 1) return absl::InvalidArgumentError("too few samples to learn a dictionary from");
  if (split.atoms > 65536) return absl::InvalidArgumentError(absl::StrCat(split.atoms, " atoms: codes hold 16 bits"));
  if (split.training * sparsity > INT_MAX)
    return absl::InvalidArgumentError(absl::StrCat(split.training, " training vectors are too many to code"));
  DeviceDictionaryTrainer trainer(dim, sparsity, split);
  KVPLAN_RETURN_IF_ERROR(trainer.Allocate(samples));
  KVPLAN_RETURN_IF_ERROR(trainer.InitialiseByKMeans(samples));
  for (int epoch = 0; epoch < epochs; ++epoch) KVPLAN_RETURN_IF_ERROR(trainer.TrainEpoch());
  return trainer.Finish(samples);
}

}  // namespace kvplan
