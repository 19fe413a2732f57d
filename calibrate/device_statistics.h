// The statistics observer's reductions where the GPU runtime offers a layer's tensors, in device memory: only
// column sums, the sampled head vectors and coverage fractions come back to the host. Implemented by
// calibrate/cuda/device_statistics_cuda.cc; a build without CUDA has none (calibrate/without_cuda.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/model_config.h"

namespace kvplan {

// One layer's tensors in device memory, laid out as ForwardObserver::OnLayerKv's.
struct DeviceLayerTensors {
  int rows = 0;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* k_pre_rope = nullptr;
  const float* v = nullptr;
  void* stream = nullptr;  // a cudaStream_t that orders work on them
};

// What comes back of one layer.
struct ReducedLayer {
  std::vector<double> sums;         // [2 * kv_dim]: the column sums of the keys before RoPE, then of the values
  std::vector<float> keys, values;  // [samples, head_dim]: the sampled key and value head vectors, in order
  std::vector<float> coverage;      // [coverage_queries, heads], as cpu::attention_coverage; when asked for
};

class DeviceStatistics {
 public:
  virtual ~DeviceStatistics() = default;
  // samples: the head vectors (row * kv_heads + head) to gather, keys after RoPE when keys_after_rope. With
  // coverage_queries > 0, also the attention coverage of the last that many rows' queries over all the rows.
  virtual absl::StatusOr<ReducedLayer> Reduce(const DeviceLayerTensors& tensors, const std::vector<int32_t>& samples,
                                              bool keys_after_rope, int coverage_queries) = 0;
};

// Null in a build without CUDA. Allocates nothing until it first reduces. coverage_mass: the attention mass a
// head's coverage must reach; max_coverage_queries: the most queries a Reduce asks coverage of.
std::unique_ptr<DeviceStatistics> CreateDeviceStatistics(const ModelConfig& config, int max_coverage_queries,
                                                         float coverage_mass);

}  // namespace kvplan
