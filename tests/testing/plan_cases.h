// Plans for runtime tests: each method alone and together, compiled by the planner from made-up calibration
// results for the 6-layer fixture (heads of very different attention coverage, so budgets range from the floor
// to most of the context), at a reference context of 256 tokens.
#pragma once

#include <algorithm>

#include "gtest/gtest.h"
#include "loader/open_model.h"
#include "planner/planner.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan::testing {

struct PlanCase {
  const char* name;
  bool budgets = false, merge = false, attention = false, coding = false, refresh = false, share = false;
  int quantize_bits = 0;  // > 0: every layer quantized to this width (exclusive with coding)
};

// Every layer quantized to `bits`, keys' channel scales cycling through 0.5, 1, 2 so the scaling path is used.
inline plan::KvQuantization TestQuantization(int num_layers, int kv_dim, int bits, int recent_window) {
  plan::KvQuantization quantization;
  quantization.set_recent_window(recent_window);
  for (int layer = 0; layer < num_layers; ++layer) {
    auto* entry = quantization.add_layers();
    entry->set_layer(layer);
    entry->set_key_bits(bits);
    entry->set_value_bits(bits);
    for (int c = 0; c < kv_dim; ++c) entry->add_key_channel_scale(0.5f * float(1 << (c % 3)));
  }
  return quantization;
}

// `coding` supplies the dictionaries when the case codes; layer 4 shares layer 2's cache when the case shares.
inline plan::Plan CompileTestPlan(const PlanCase& c, const LoadedModel& loaded, const plan::SparseCoding& coding) {
  PlannerInputs inputs;
  inputs.model = FingerprintModel(loaded.config, *loaded.weights);
  inputs.target_memory_ratio = 0.3f;
  inputs.reference_context = 256;
  if (c.budgets) {
    inputs.attention_coverage = std::vector<std::vector<float>>(loaded.config.num_layers, {0.05f, 0.6f});
    inputs.budget_settings.policy.min_tokens = 8;
    inputs.budget_settings.policy.recent_window = 16;
    inputs.budget_settings.policy.merge_evicted = c.merge;
    if (c.attention) inputs.budget_settings.policy.scoring = plan::TokenBudgets::ATTENTION_SCORE;
  }
  if (c.share) {
    auto* share = inputs.sharing.add_shares();
    share->set_layer(4);
    share->set_donor(2);
  }
  if (c.coding) {
    inputs.sparse_coding = coding;
    auto* layers = inputs.sparse_coding.mutable_layers();
    if (c.share)  // a sharer stores nothing, so it has no dictionaries
      layers->erase(
          std::remove_if(layers->begin(), layers->end(), [](const auto& entry) { return entry.layer() == 4; }),
          layers->end());
  }
  if (c.quantize_bits > 0)
    inputs.quantization =
        TestQuantization(loaded.config.num_layers, loaded.config.kv_dim(), c.quantize_bits, /*recent_window=*/32);
  inputs.refresh = c.refresh;
  inputs.refresh_policy.min_small_cache_tokens = 16;
  auto plan = CompilePlan(inputs);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return *plan;
}

// One atom per dimension: with `sparsity` = head_dim a vector is coded exactly but for fp16 coefficients.
inline plan::SparseCoding BasisCoding(int num_layers, int head_dim, int sparsity, int recent_window) {
  plan::SparseCoding coding;
  coding.set_key_sparsity(sparsity);
  coding.set_value_sparsity(sparsity);
  coding.set_recent_window(recent_window);
  for (int layer = 0; layer < num_layers; ++layer) {
    auto* entry = coding.add_layers();
    entry->set_layer(layer);
    for (plan::Dictionary* dictionary : {entry->mutable_keys(), entry->mutable_values()}) {
      dictionary->set_atoms(head_dim);
      dictionary->set_dim(head_dim);
      for (int i = 0; i < head_dim * head_dim; ++i) dictionary->add_values(i / head_dim == i % head_dim ? 1.0f : 0.0f);
    }
  }
  return coding;
}

}  // namespace kvplan::testing
