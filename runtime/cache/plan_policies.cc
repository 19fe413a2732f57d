#include "runtime/cache/plan_policies.h"

#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "plans/plan_io.h"
#include "runtime/cache/compressed_cache.h"

namespace kvplan {
namespace {

// Everything the caches of one model point into; shared by the factory's copies.
struct PlanPolicies {
  std::map<int, int> donor_of;  // sharer layer -> donor layer
  std::map<int, DictionaryPolicy> dictionaries;
  std::map<int, BudgetPolicy> budgets;
  std::map<int, RefreshPolicy> refreshes;
};

std::shared_ptr<PlanPolicies> PoliciesFromPlan(const plan::Plan& plan) {
  auto policies = std::make_shared<PlanPolicies>();
  for (const auto& share : plan.sharing().shares()) policies->donor_of[share.layer()] = share.donor();
  const plan::SparseCoding& coding = plan.sparse_coding();
  for (const auto& entry : coding.layers()) {
    DictionaryPolicy& dictionary = policies->dictionaries[entry.layer()];
    dictionary.key_atoms.assign(entry.keys().values().begin(), entry.keys().values().end());
    dictionary.value_atoms.assign(entry.values().values().begin(), entry.values().values().end());
    dictionary.atoms = entry.keys().atoms();
    dictionary.key_sparsity = coding.key_sparsity();
    dictionary.value_sparsity = coding.value_sparsity();
    dictionary.recent_window = coding.recent_window();
  }
  const plan::TokenBudgets& budgets = plan.budgets();
  for (const auto& layer : budgets.layers()) {
    BudgetPolicy& budget = policies->budgets[layer.layer()];
    budget.head_keep_fraction.assign(layer.head_keep_fraction().begin(), layer.head_keep_fraction().end());
    budget.scoring = budgets.scoring() == plan::TokenBudgets::ATTENTION_SCORE ? BudgetPolicy::Scoring::kAttention
                                                                              : BudgetPolicy::Scoring::kKeyL2Norm;
    budget.recent_window = budgets.recent_window();
    budget.sink_tokens = budgets.sink_tokens();
    budget.min_tokens = budgets.min_tokens();
    budget.merge_evicted = budgets.merge_evicted();
    budget.merge_compensation = budgets.merge_compensation();
    budget.score_decay = budgets.score_decay() > 0 ? budgets.score_decay() : 1.0f;
  }
  const plan::RefreshSchedule& refresh = plan.refresh();
  for (int layer : refresh.layers()) {
    RefreshPolicy& policy = policies->refreshes[layer];
    policy.small_cache_fraction = refresh.small_cache_fraction();
    policy.min_small_cache_tokens = refresh.min_small_cache_tokens();
    policy.refresh_stride = refresh.refresh_stride();
    policy.query_similarity_threshold = refresh.query_similarity_threshold();
    policy.pool_kernel = std::max(1, refresh.pool_kernel());
  }
  return policies;
}

template <typename T>
const T* Find(const std::map<int, T>& map, int layer) {
  const auto it = map.find(layer);
  return it == map.end() ? nullptr : &it->second;
}

}  // namespace

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

absl::StatusOr<LayerCacheFactory> PlanCacheFactory(const plan::Plan& plan, const ModelConfig& config,
                                                   const WeightSource& weights) {
  if (absl::Status status = ValidatePlanStructure(plan); !status.ok()) return status;
  if (absl::Status status = CheckPlanMatchesModel(plan, FingerprintModel(config, weights)); !status.ok())
    return status;
  if (config.sliding_window > 0)
    return absl::UnimplementedError("compressed caches do not implement sliding-window attention (Mistral-style)");
  std::shared_ptr<PlanPolicies> policies = PoliciesFromPlan(plan);
  return LayerCacheFactory([policies](const ModelConfig& model, int num_sequences, int capacity) {
    std::vector<std::unique_ptr<LayerCache>> caches;
    for (int layer = 0; layer < model.num_layers; ++layer) {
      if (const int* donor = Find(policies->donor_of, layer)) {
        caches.push_back(CreateSharedLayerCache(caches[*donor].get()));
        continue;
      }
      const LayerCachePolicy policy{Find(policies->dictionaries, layer), Find(policies->budgets, layer),
                                    Find(policies->refreshes, layer)};
      if (policy.dictionary == nullptr && policy.budget == nullptr && policy.refresh == nullptr) {
        caches.push_back(CreateDenseLayerCache(model, num_sequences, capacity));
      } else {
        caches.push_back(CreateCompressedLayerCache(model, num_sequences, policy));
      }
    }
    return caches;
  });
}

absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             const plan::Plan& plan, CpuModelOptions options) {
  absl::StatusOr<LayerCacheFactory> factory = PlanCacheFactory(plan, config, weights);
  if (!factory.ok()) return factory.status();
  options.cache_factory = std::move(*factory);
  options.chunk_rows = kPlannedChunkRows;
  options.device_label = "cpu+plan";
  return CreateCpuModel(config, weights, options);
}

}  // namespace kvplan
