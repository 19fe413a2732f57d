#include "runtime/backend.h"

#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/cpu/cpu_model.h"
#ifdef KVPLAN_WITH_CUDA
#include "kernels/cuda/kernels.h"
#include "runtime/cuda/cuda_model.h"
#endif

namespace kvplan {

absl::StatusOr<Backend> ParseBackend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "cpu") return Backend::kCpu;
  if (name == "cuda") return Backend::kCuda;
  return absl::InvalidArgumentError(absl::StrCat("unknown device \"", name, "\" (auto, cpu, cuda)"));
}

absl::StatusOr<std::unique_ptr<Model>> CreateModel(const ModelConfig& config, const WeightSource& weights,
                                                   const ModelOptions& options) {
  std::optional<PlanPolicies> policies;
  if (options.plan != nullptr) {
    KVPLAN_ASSIGN_OR_RETURN(policies, PoliciesFromPlan(*options.plan, config, weights));
  }
#ifdef KVPLAN_WITH_CUDA
  // auto takes the GPU when there is one and it executes the whole plan.
  const bool cuda_executes_plan = !policies || CudaSupports(policies->cache, config).ok();
  if (options.backend == Backend::kCuda ||
      (options.backend == Backend::kAuto && cuda::device_available() && cuda_executes_plan)) {
    CudaModelOptions cuda_options{.num_sequences = options.num_sequences,
                                  .capacity = options.capacity,
                                  .max_rows = options.max_rows,
                                  .cuda_graphs = options.cuda_graphs,
                                  .observer = options.observer};
    if (policies) {
      cuda_options.policy = policies->cache;
      cuda_options.codebooks = policies->codebooks;
    }
    return CreateCudaModel(config, weights, cuda_options);
  }
#else
  if (options.backend == Backend::kCuda)
    return absl::FailedPreconditionError("this kvplan was built without CUDA (configure with -DKVPLAN_CUDA=ON)");
#endif
  const CpuModelOptions cpu_options{
      .num_sequences = options.num_sequences, .capacity = options.capacity, .observer = options.observer};
  if (policies)
    return CreatePlannedCpuModel(config, weights, std::make_shared<const PlanPolicies>(*std::move(policies)),
                                 cpu_options);
  return CreateCpuModel(config, weights, cpu_options);
}

Backend ResolveBackend(Backend backend) {
#ifdef KVPLAN_WITH_CUDA
  if (backend == Backend::kAuto) return cuda::device_available() ? Backend::kCuda : Backend::kCpu;
  return backend;
#else
  return backend == Backend::kAuto ? Backend::kCpu : backend;
#endif
}

int64_t DeviceBytesInUse() {
#ifdef KVPLAN_WITH_CUDA
  size_t free = 0, total = 0;
  if (cuda::device_available() && cudaMemGetInfo(&free, &total) == cudaSuccess) return int64_t(total - free);
#endif
  return 0;
}

absl::StatusOr<int> FitBatchToMemory([[maybe_unused]] Model& model, [[maybe_unused]] int64_t device_bytes) {
#ifdef KVPLAN_WITH_CUDA
  if (model.device_name().rfind("cpu", 0) != 0) return BatchToFit(model, device_bytes);
#endif
  return absl::UnimplementedError("fitting a batch to device memory needs the CUDA runtime");
}

}  // namespace kvplan
