// Executes a plan file on the CPU runtime: checks it belongs to the model, turns its decisions into layer-cache
// policies and builds the per-layer caches. The only runtime code that reads the plan schema.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "loader/model_config.h"
#include "loader/weights.h"
#include "plans/kvplan.pb.h"
#include "runtime/cpu/cpu_model.h"

namespace kvplan {

plan::ModelFingerprint FingerprintModel(const ModelConfig& config, const WeightSource& weights);

// Rows per prefill pass when a plan compresses the cache, so eviction keeps up with a long prompt.
inline constexpr int kPlannedChunkRows = 128;

// Validates the plan against the model and returns a cache factory executing it (owns the policies).
absl::StatusOr<LayerCacheFactory> PlanCacheFactory(const plan::Plan& plan, const ModelConfig& config,
                                                   const WeightSource& weights);

absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             const plan::Plan& plan, CpuModelOptions options);

}  // namespace kvplan
