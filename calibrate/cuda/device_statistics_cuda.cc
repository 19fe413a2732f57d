// DeviceStatistics on the GPU: kernels/cuda/calibration_statistics.h reduces a layer's tensors on the runtime's
// stream, and only the results are copied back.
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "base/status_macros.h"
#include "calibrate/device_statistics.h"
#include "kernels/cuda/calibration_statistics.h"
#include "runtime/cuda/device_memory.h"

namespace kvplan {
namespace {

class CudaStatistics : public DeviceStatistics {
 public:
  CudaStatistics(const ModelConfig& config, int max_coverage_queries, float coverage_mass)
      : config_(config), max_coverage_queries_(max_coverage_queries), coverage_mass_(coverage_mass) {}

  absl::StatusOr<ReducedLayer> Reduce(const DeviceLayerTensors& tensors, const std::vector<int32_t>& samples,
                                      bool keys_after_rope, int coverage_queries) override {
    const int kv_dim = config_.kv_dim(), hd = config_.head_dim, rows = tensors.rows;
    const cudaStream_t stream = static_cast<cudaStream_t>(tensors.stream);
    if (sums_.bytes() == 0) {
      KVPLAN_RETURN_IF_ERROR(sums_.Allocate(2 * kv_dim * sizeof(double)));
      KVPLAN_RETURN_IF_ERROR(coverage_.Allocate(size_t(max_coverage_queries_) * config_.num_heads * sizeof(float)));
    }
    KVPLAN_CUDA(cudaMemsetAsync(sums_.as<void>(), 0, sums_.bytes(), stream));
    KVPLAN_CUDA(cuda::add_column_sums(tensors.k_pre_rope, rows, kv_dim, sums_.as<double>(), stream));
    KVPLAN_CUDA(cuda::add_column_sums(tensors.v, rows, kv_dim, sums_.as<double>() + kv_dim, stream));
    const int sampled = int(samples.size());
    if (gathered_.bytes() < 2 * size_t(sampled) * hd * sizeof(float)) {
      KVPLAN_RETURN_IF_ERROR(indices_.Allocate(size_t(sampled) * sizeof(int32_t)));
      KVPLAN_RETURN_IF_ERROR(gathered_.Allocate(2 * size_t(sampled) * hd * sizeof(float)));
    }
    ReducedLayer reduced;
    reduced.keys.resize(size_t(sampled) * hd);
    reduced.values.resize(reduced.keys.size());
    reduced.sums.resize(2 * kv_dim);
    reduced.coverage.resize(size_t(coverage_queries) * config_.num_heads);
    KVPLAN_CUDA(cudaMemcpyAsync(indices_.as<void>(), samples.data(), sampled * sizeof(int32_t), cudaMemcpyHostToDevice,
                                stream));
    float* gathered = gathered_.as<float>();
    KVPLAN_CUDA(cuda::gather_rows(keys_after_rope ? tensors.k : tensors.k_pre_rope, indices_.as<int32_t>(), sampled, hd,
                                  gathered, stream));
    KVPLAN_CUDA(
        cuda::gather_rows(tensors.v, indices_.as<int32_t>(), sampled, hd, gathered + reduced.keys.size(), stream));
    if (coverage_queries > 0)
      KVPLAN_CUDA(cuda::attention_coverage(tensors.q, tensors.k, rows, config_.num_heads, config_.num_kv_heads, hd,
                                           rows - coverage_queries, coverage_mass_, coverage_.as<float>(), stream));
    for (auto [host, device, bytes] :
         {std::tuple{static_cast<void*>(reduced.keys.data()), static_cast<const void*>(gathered),
                     reduced.keys.size() * sizeof(float)},
          {reduced.values.data(), gathered + reduced.keys.size(), reduced.values.size() * sizeof(float)},
          {reduced.sums.data(), sums_.as<void>(), reduced.sums.size() * sizeof(double)},
          {reduced.coverage.data(), coverage_.as<void>(), reduced.coverage.size() * sizeof(float)}})
      if (bytes > 0) KVPLAN_CUDA(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream));
    KVPLAN_CUDA(cudaStreamSynchronize(stream));
    return reduced;
  }

 private:
  const ModelConfig config_;
  int max_coverage_queries_;
  float coverage_mass_;
  DeviceBuffer sums_, coverage_, indices_, gathered_;
};

}  // namespace

std::unique_ptr<DeviceStatistics> CreateDeviceStatistics(const ModelConfig& config, int max_coverage_queries,
                                                         float coverage_mass) {
  return std::make_unique<CudaStatistics>(config, max_coverage_queries, coverage_mass);
}

}  // namespace kvplan
