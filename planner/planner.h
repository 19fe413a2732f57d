// The plan compiler: turns what calibration measured and learned into a plan that meets a memory target,
// and explains plans (inspect). Pure functions over the plan schema; no model code.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "plans/cache_policy.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

struct BudgetSettings {
  BudgetPolicy policy;                      // every budgeted layer's rule; the planner sets the per-head fractions
  std::vector<int> exempt_layers = {0, 1};  // L2-norm eviction hurts the first layers (Devoto et al.)
};

// One setting the quality optimiser can give a layer: a quantization width (16: bf16) and the fraction of the
// context each KV head keeps.
struct LayerSetting {
  int bits = 16;
  float keep_fraction = 1.0f;
};
// A setting with the losses calibration measured for it: mean KL divergence per token from the full cache with
// only this layer compressed.
struct MeasuredSetting {
  LayerSetting setting;
  double kl = 0;
  double probe_kl = 0;  // the same on retrieval probes, over the rows that predict the pass key
};

struct PlannerInputs {
  plan::ModelFingerprint model;
  plan::CalibrationInfo calibration;
  float target_memory_ratio = 0.2f;  // plan bytes / full-cache bytes at reference_context
  int reference_context = 2048;
  plan::LayerSharing sharing;         // accepted shares from the calibration search (may be empty)
  plan::SparseCoding sparse_coding;   // learned dictionaries (may be empty)
  plan::KvQuantization quantization;  // per-layer widths and key channel scales (may be empty)
  // Per layer and KV head: the fraction of the context that held 90% of the attention mass on calibration
  // data. Empty: no token budgets.
  std::vector<std::vector<float>> attention_coverage;
  BudgetSettings budget_settings;
  bool refresh = false;
  RefreshPolicy refresh_policy;
  // The quality optimiser: per layer, the settings calibration measured (the full cache, loss 0, is implied).
  // When given, the planner picks for every layer that is not a sharer the setting that meets the target at the
  // least summed loss (greedy over each layer's lower convex hull of bytes and loss) and writes quantization (with
  // `quantization`'s key channel scales) and budgets (budget_settings.policy) accordingly; attention_coverage and
  // sparse_coding are then unused.
  std::vector<std::vector<MeasuredSetting>> measured_settings;
  double retrieval_weight = 0;  // a setting's loss: kl + retrieval_weight * probe_kl
};

// The cache policy one layer has under `setting` (budget rules from `budget`, quantization window `window`).
LayerPolicy LayerPolicyForSetting(const LayerSetting& setting, const BudgetPolicy& budget, int quantization_window,
                                  int head_dim, int kv_heads);

// Assembles the plan; token budgets are scaled (keeping each head's share proportional to its attention
// coverage) until the estimated cache at reference_context meets target_memory_ratio, or as close as the
// floors allow. Memory estimates for 512 to 32K tokens are recorded in the plan.
absl::StatusOr<plan::Plan> CompilePlan(const PlannerInputs& inputs);

// OK when the plan's cache at its reference context is within its memory target; otherwise FailedPrecondition
// naming the method that stopped short.
absl::Status CheckMemoryTarget(const plan::Plan& plan);

// Bytes of K/V at `context` tokens (plans/cache_policy.h): the full cache in bf16, and what the plan keeps
// (codes, positions and refresh selections included).
int64_t FullCacheBytes(const plan::ModelFingerprint& model, int64_t context);
int64_t PlanCacheBytes(const plan::Plan& plan, int64_t context);

// inspect: every decision and the memory per context length (the plan's recorded estimates, or the given
// contexts), as text or as JSON (dictionary atoms are summarised, not listed, unless include_atoms).
std::string DescribePlan(const plan::Plan& plan, const std::vector<int>& contexts = {});
absl::StatusOr<std::string> PlanToJson(const plan::Plan& plan, bool include_atoms);

}  // namespace kvplan
