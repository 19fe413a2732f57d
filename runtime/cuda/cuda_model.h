// The GPU runtime: bf16 weights and KV cache, fp32 residual stream, cuBLAS GEMMs (bf16 in, fp32 accumulate)
// and the kernels in kernels/cuda. Built only with KVPLAN_CUDA; cuda::device_available() (kernels/cuda/kernels.h) says
// whether a GPU is present at run time, so callers and tests can fall back to the CPU runtime.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "loader/weights.h"
#include "plans/cache_policy.h"
#include "runtime/cache/compressed_cache.h"
#include "runtime/model.h"

namespace kvplan {

struct CudaModelOptions {
  int num_sequences = 1;
  int capacity = 0;     // 0: the model's max_position_embeddings
  int max_rows = 2048;  // most rows one Forward may carry
  // Decode steps (one row per sequence) run as CUDA graphs, captured once per row count.
  bool cuda_graphs = true;
  // The cache policy to execute (runtime/cache/plan_policies.h makes it and the codebooks from a plan); none:
  // the full cache.
  std::optional<CachePolicy> policy;
  std::vector<std::shared_ptr<const LayerCodebook>> codebooks;  // [num_layers] where the policy codes
  // Sees each pass's layer tensors and final hidden states on the host, as the CPU runtime shows them (fp32;
  // queries and keys after RoPE); each costs a copy from the device and a synchronisation.
  ForwardObserver* observer = nullptr;
};

// OK when the CUDA runtime executes every layer of `policy` on this model's shape; Unimplemented naming what
// it does not.
absl::Status CudaSupports(const CachePolicy& policy, const ModelConfig& config);

// Resizes a model CreateCudaModel made to the largest batch (sequences decoded together, one row each) whose
// device memory, weights and everything else of the process included, stays within `device_bytes`. Returns the
// batch; every sequence starts empty.
absl::StatusOr<int> BatchToFit(Model& model, int64_t device_bytes);

// Entry counts of every head slot of a compressed layer of a model CreateCudaModel made, read back from the device
// (tests hold them to the policy's ExpectedHeadEntries).
absl::StatusOr<std::vector<HeadEntries>> ReadCudaHeadEntries(const Model& model, int layer);

absl::StatusOr<std::unique_ptr<Model>> CreateCudaModel(const ModelConfig& config, const WeightSource& weights,
                                                       const CudaModelOptions& options);

}  // namespace kvplan
