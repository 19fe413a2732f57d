// A plan, checked against the model it is to run on and turned into what caches execute: the cache policy of
// every layer and the codebooks coded layers need. The only runtime code that reads the plan schema.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/model_config.h"
#include "loader/weights.h"
#include "plans/cache_policy.h"
#include "plans/kvplan.pb.h"
#include "runtime/cache/compressed_cache.h"
#include "runtime/cache/layer_cache.h"

namespace kvplan {

plan::ModelFingerprint FingerprintModel(const ModelConfig& config, const WeightSource& weights);

struct PlanPolicies {
  CachePolicy cache;
  std::vector<std::shared_ptr<const LayerCodebook>> codebooks;  // [num_layers], null where not coded
};

// Every check a plan must pass before it runs: its structure, that it was calibrated for exactly this model,
// and that the caches implement what the model needs (no sliding-window attention).
absl::StatusOr<PlanPolicies> PoliciesFromPlan(const plan::Plan& plan, const ModelConfig& config,
                                              const WeightSource& weights);

// The CPU runtime's caches for every layer under `policies`.
LayerCacheFactory PlanCacheFactory(std::shared_ptr<const PlanPolicies> policies);

}  // namespace kvplan
