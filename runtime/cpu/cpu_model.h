// The CPU reference runtime: fp32 weights and activations, OpenBLAS GEMMs, the kernels/cpu/ oracles for
// everything else, and a dense fp32 KV cache. It is the oracle the CUDA runtime and the compressed
// caches are measured against.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loader/weights.h"
#include "plans/kvplan.pb.h"
#include "runtime/cache/layer_cache.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/model.h"

namespace kvplan {

struct CpuModelOptions {
  int num_sequences = 1;
  int capacity = 0;  // 0: the model's max_position_embeddings
  LayerCacheFactory cache_factory;
  // Rows per pass and sequence (ChunkRows): a long prefill runs in chunks so compressed caches evict between
  // chunks and never hold the whole prompt at once. 0: one pass.
  int chunk_rows = 0;
  ForwardObserver* observer = nullptr;
  std::string device_label = "cpu";
};

absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                      const CpuModelOptions& options);

// The CPU runtime executing `plan` once PoliciesFromPlan (runtime/cache/plan_policies.h) accepts it, or policies
// already made from one.
absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             const plan::Plan& plan, CpuModelOptions options);
absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             std::shared_ptr<const PlanPolicies> policies,
                                                             CpuModelOptions options);

}  // namespace kvplan
