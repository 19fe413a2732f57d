#include "runtime/backend.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
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
  if (options.plan != nullptr) {
    // The CUDA kernels for compressed caches exist (kernels/cuda/compressed.cu) but the GPU runtime does not
    // execute plans yet: say so rather than silently running the full cache.
    if (options.backend == Backend::kCuda)
      return absl::UnimplementedError("plans execute on the CPU runtime only; use --device cpu (or auto)");
    return CreatePlannedCpuModel(config, weights, *options.plan,
                                 {.num_sequences = options.num_sequences, .capacity = options.capacity});
  }
#ifdef KVPLAN_WITH_CUDA
  if (options.backend == Backend::kCuda || (options.backend == Backend::kAuto && cuda::device_available()))
    return CreateCudaModel(
        config, weights,
        {.num_sequences = options.num_sequences, .capacity = options.capacity, .max_rows = options.max_rows});
#else
  if (options.backend == Backend::kCuda)
    return absl::FailedPreconditionError("this kvplan was built without CUDA (configure with -DKVPLAN_CUDA=ON)");
#endif
  return CreateCpuModel(config, weights, {.num_sequences = options.num_sequences, .capacity = options.capacity});
}

}  // namespace kvplan
