// Picks the runtime a command runs on.
#pragma once

#include <memory>
#include <string>

#include "loader/weights.h"
#include "plans/kvplan.pb.h"
#include "runtime/model.h"

namespace kvplan {

enum class Backend { kAuto, kCpu, kCuda };
absl::StatusOr<Backend> ParseBackend(const std::string& name);  // auto | cpu | cuda

struct ModelOptions {
  Backend backend = Backend::kAuto;  // auto: CUDA when built with it and a device is present
  int num_sequences = 1;
  int capacity = 0;                     // 0: the model's max_position_embeddings
  int max_rows = 2048;                  // CUDA: most rows per Forward
  const plan::Plan* plan = nullptr;     // execute this cache plan
  bool cuda_graphs = true;              // CUDA: decode steps as CUDA graphs
  ForwardObserver* observer = nullptr;  // sees every layer's tensors (calibration)
};
absl::StatusOr<std::unique_ptr<Model>> CreateModel(const ModelConfig& config, const WeightSource& weights,
                                                   const ModelOptions& options);

// The runtime `backend` stands for on this machine: auto is CUDA when built with it and a device is present.
Backend ResolveBackend(Backend backend);

// Bytes of device memory in use now (every allocation on the device, the CUDA context's included); 0 without
// CUDA.
int64_t DeviceBytesInUse();

// Resizes a GPU model to the largest batch of decoding sequences whose device memory (weights included) fits
// in `device_bytes`; returns the batch. Unimplemented for the CPU runtime.
absl::StatusOr<int> FitBatchToMemory(Model& model, int64_t device_bytes);

}  // namespace kvplan
