#include "runtime/cache/plan_policies.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "plans/plan_io.h"

namespace kvplan {

plan::ModelFingerprint FingerprintModel(const ModelConfig& config, const WeightSource& weights) {
  plan::ModelFingerprint fingerprint;
  fingerprint.set_architecture(config.architecture);
  fingerprint.set_num_layers(config.num_layers);
  fingerprint.set_hidden_size(config.hidden_size);
  fingerprint.set_num_heads(config.num_heads);
  fingerprint.set_num_kv_heads(config.num_kv_heads);
  fingerprint.set_head_dim(config.head_dim);
  fingerprint.set_vocab_size(config.vocab_size);
  fingerprint.set_weights_hash(weights.content_hash());
  return fingerprint;
}

absl::StatusOr<PlanPolicies> PoliciesFromPlan(const plan::Plan& plan, const ModelConfig& config,
                                              const WeightSource& weights) {
  KVPLAN_RETURN_IF_ERROR(ValidatePlanStructure(plan));
  KVPLAN_RETURN_IF_ERROR(CheckPlanMatchesModel(plan, FingerprintModel(config, weights)));
  if (config.sliding_window > 0)
    return absl::UnimplementedError(absl::StrCat("compressed caches do not implement sliding-window attention (",
                                                 config.architecture, " uses a window of ", config.sliding_window,
                                                 " tokens)"));
  PlanPolicies policies{.cache = CachePolicyFromPlan(plan), .codebooks = {}};
  policies.codebooks.resize(config.num_layers);
  for (const auto& entry : plan.sparse_coding().layers())
    policies.codebooks[entry.layer()] = std::make_shared<const LayerCodebook>(
        LayerCodebook{.atoms = entry.keys().atoms(),
                      .key_atoms = {entry.keys().values().begin(), entry.keys().values().end()},
                      .value_atoms = {entry.values().values().begin(), entry.values().values().end()}});
  for (const auto& entry : plan.quantization().layers())
    policies.codebooks[entry.layer()] = std::make_shared<const LayerCodebook>(
        LayerCodebook{.key_channel_scale = {entry.key_channel_scale().begin(), entry.key_channel_scale().end()}});
  return policies;
}

LayerCacheFactory PlanCacheFactory(std::shared_ptr<const PlanPolicies> policies) {
  return [policies](const ModelConfig& config, int num_sequences, int capacity, int max_step_rows) {
    std::vector<std::unique_ptr<LayerCache>> caches;
    for (int layer = 0; layer < config.num_layers; ++layer) {
      const LayerPolicy& policy = policies->cache.layers[layer];
      if (policy.shares())
        caches.push_back(CreateSharedLayerCache(caches[policy.donor].get()));
      else if (policy.keeps_full_cache())
        caches.push_back(CreateDenseLayerCache(config, num_sequences, capacity));
      else
        caches.push_back(CreateCompressedLayerCache(config, num_sequences, capacity, max_step_rows, policy,
                                                    policies->codebooks[layer]));
    }
    return caches;
  };
}

}  // namespace kvplan
