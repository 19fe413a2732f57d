// The CPU reference runtime: fp32 weights and activations, OpenBLAS GEMMs, kernels/cpu_reference.h for
// everything else, and a dense fp32 KV cache. It is the oracle the CUDA runtime and the compressed
// caches are measured against.
#pragma once

#include <memory>

#include "runtime/model.h"
#include "runtime/weights.h"

namespace kvplan {

struct CpuModelOptions {
  int num_sequences = 1;
  int capacity = 0;  // 0: the model's max_position_embeddings
};

absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                      const CpuModelOptions& options);

}  // namespace kvplan
