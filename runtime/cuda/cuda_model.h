// The GPU runtime: bf16 weights and KV cache, fp32 residual stream, cuBLAS GEMMs (bf16 in, fp32 accumulate)
// and the kernels in kernels/cuda. Built only with KVPLAN_CUDA; cuda::device_available() (kernels/cuda/kernels.h) says
// whether a GPU is present at run time, so callers and tests can fall back to the CPU runtime.
#pragma once

#include <memory>
#include <string>

#include "loader/weights.h"
#include "runtime/model.h"

namespace kvplan {

struct CudaModelOptions {
  int num_sequences = 1;
  int capacity = 0;     // 0: the model's max_position_embeddings
  int max_rows = 2048;  // most rows one Forward may carry
};

absl::StatusOr<std::unique_ptr<Model>> CreateCudaModel(const ModelConfig& config, const WeightSource& weights,
                                                       const CudaModelOptions& options);

}  // namespace kvplan
