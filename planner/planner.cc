#include "planner/planner.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "plans/plan_io.h"

namespace kvplan {
namespace {

constexpr int kEstimateContexts[] = {512, 1024, 2048, 4096, 8192, 32768};

std::set<int> Sharers(const plan::Plan& plan) {
  std::set<int> sharers;
  for (const auto& share : plan.sharing().shares()) sharers.insert(share.layer());
  return sharers;
}

void RecordEstimates(plan::Plan& plan) {
  plan.clear_memory();
  for (int context : kEstimateContexts) {
    plan::MemoryEstimate* estimate = plan.add_memory();
    estimate->set_context(context);
    estimate->set_full_cache_bytes(FullCacheBytes(plan.model(), context));
    estimate->set_plan_cache_bytes(PlanCacheBytes(plan, context));
  }
}

// Appends a method's heading, and " none" when the plan does not use it; true when the caller should append the
// method's summary line.
bool Heading(std::string& out, const char* title, bool used) {
  out += title;
  if (!used) out += " none\n";
  return used;
}

std::string Bytes(int64_t bytes) {
  if (bytes >= (int64_t(1) << 30)) return absl::StrFormat("%.2f GiB", bytes / double(int64_t(1) << 30));
  if (bytes >= (1 << 20)) return absl::StrFormat("%.2f MiB", bytes / double(1 << 20));
  return absl::StrFormat("%.1f KiB", bytes / 1024.0);
}

int ReferenceContext(const plan::Plan& plan) { return plan.reference_context() > 0 ? plan.reference_context() : 2048; }

double AchievedMemoryRatio(const plan::Plan& plan) {
  const int reference = ReferenceContext(plan);
  return double(PlanCacheBytes(plan, reference)) / FullCacheBytes(plan.model(), reference);
}

bool MeetsMemoryTarget(const plan::Plan& plan) {
  return plan.target_memory_ratio() <= 0 || AchievedMemoryRatio(plan) <= plan.target_memory_ratio() * 1.001;
}

// The method that stopped short of the target: token budgets are the only one the planner sizes to it; the
// others compress by a fixed amount.
std::string ShortfallReason(const plan::Plan& plan) {
  if (plan.optimiser().layers_size() > 0) return "every layer is at the cheapest setting the optimiser measured";
  if (plan.budgets().layers_size() > 0) return "token budgets are at their floor";
  std::vector<std::string> fixed;
  if (plan.sharing().shares_size() > 0)
    fixed.push_back(
        absl::StrFormat("layer sharing: %d of %d layers", plan.sharing().shares_size(), plan.model().num_layers()));
  if (plan.sparse_coding().layers_size() > 0) fixed.push_back("sparse coding");
  if (plan.quantization().layers_size() > 0) fixed.push_back("quantization");
  if (plan.refresh().layers_size() > 0) fixed.push_back("RefreshKV");
  return absl::StrCat(
      "the plan has no token budgets to shrink",
      fixed.empty() ? ""
                    : absl::StrCat(" and its methods compress by a fixed amount (", absl::StrJoin(fixed, "; "), ")"),
      ": add budget to the methods or raise the target");
}

// The optimiser: every layer that is not a sharer gets one of its measured settings. Greedy over each layer's
// lower convex hull of (bytes, loss): the step saving bytes at the least loss per byte goes first, which is the
// optimum of the relaxed multiple-choice knapsack and within one step of the exact one.
absl::Status ChooseMeasuredSettings(const PlannerInputs& inputs, const std::set<int>& sharers, plan::Plan& plan) {
  const int layers = inputs.model.num_layers(), kv_heads = inputs.model.num_kv_heads(), hd = inputs.model.head_dim();
  if (int(inputs.measured_settings.size()) != layers)
    return absl::InvalidArgumentError("measured settings must list every layer");
  if (inputs.quantization.layers_size() != layers)
    return absl::InvalidArgumentError("the optimiser needs every layer's key channel scales");
  const BudgetPolicy& budget = inputs.budget_settings.policy;
  const int window = inputs.quantization.recent_window(), context = inputs.reference_context;
  auto bytes_of = [&](const LayerSetting& setting) {
    const CachePolicy single{.num_kv_heads = kv_heads,
                             .head_dim = hd,
                             .layers = {LayerPolicyForSetting(setting, budget, window, hd, kv_heads)}};
    return CacheBytes(single, context);
  };
  struct Option {
    MeasuredSetting measured;
    int64_t bytes;
  };
  auto loss = [&](const Option& option) {
    return option.measured.kl + inputs.retrieval_weight * option.measured.probe_kl;
  };
  struct Step {
    int layer, to;  // index into the layer's hull
    double slope;   // loss added per byte saved
  };
  std::vector<std::vector<Option>> hulls(layers);
  std::vector<int64_t> full_bytes(layers, 0);
  std::vector<Step> steps;
  for (int layer = 0; layer < layers; ++layer) {
    if (sharers.contains(layer)) continue;
    std::vector<Option> options = {{MeasuredSetting{}, bytes_of(LayerSetting{})}};
    for (const MeasuredSetting& measured : inputs.measured_settings[layer])
      options.push_back({measured, bytes_of(measured.setting)});
    // Most bytes first; among equal bytes the least loss.
    std::sort(options.begin(), options.end(), [&](const Option& a, const Option& b) {
      return a.bytes != b.bytes ? a.bytes > b.bytes : loss(a) < loss(b);
    });
    std::vector<Option>& hull = hulls[layer];
    auto slope = [&](const Option& from, const Option& to) {
      return (loss(to) - loss(from)) / double(from.bytes - to.bytes);
    };
    for (const Option& option : options) {
      if (!hull.empty() && option.bytes == hull.back().bytes) continue;  // as large, no better
      // A setting with fewer bytes and no more loss makes the larger ones pointless.
      while (!hull.empty() && loss(option) <= loss(hull.back())) hull.pop_back();
      while (hull.size() >= 2 && slope(hull[hull.size() - 2], hull.back()) >= slope(hull.back(), option))
        hull.pop_back();
      hull.push_back(option);
    }
    for (size_t i = 1; i < hull.size(); ++i) steps.push_back({layer, int(i), slope(hull[i - 1], hull[i])});
    full_bytes[layer] = options.front().bytes;
  }
  std::stable_sort(steps.begin(), steps.end(), [](const Step& a, const Step& b) { return a.slope < b.slope; });
  std::vector<int> chosen(layers, 0);
  int64_t total = 0;
  for (int layer = 0; layer < layers; ++layer)
    if (!hulls[layer].empty()) total += hulls[layer][0].bytes;
  const double target = inputs.target_memory_ratio * double(FullCacheBytes(inputs.model, context));
  for (const Step& step : steps) {
    if (double(total) <= target) break;
    total += hulls[step.layer][step.to].bytes - hulls[step.layer][chosen[step.layer]].bytes;
    chosen[step.layer] = step.to;
  }
  // The last step may overshoot the target by a whole setting: give back, one at a time, the steps whose undoing
  // recovers the most loss while the target still holds.
  while (true) {
    int best_layer = -1;
    double best_recovered = 0;
    for (int layer = 0; layer < layers; ++layer) {
      if (chosen[layer] == 0) continue;
      const Option &now = hulls[layer][chosen[layer]], &before = hulls[layer][chosen[layer] - 1];
      const double recovered = loss(now) - loss(before);
      if (double(total + before.bytes - now.bytes) <= target && recovered > best_recovered) {
        best_layer = layer;
        best_recovered = recovered;
      }
    }
    if (best_layer < 0) break;
    total += hulls[best_layer][chosen[best_layer] - 1].bytes - hulls[best_layer][chosen[best_layer]].bytes;
    --chosen[best_layer];
  }

  plan::KvQuantization* quantization = plan.mutable_quantization();
  quantization->Clear();
  quantization->set_recent_window(window);
  plan::TokenBudgets* budgets = plan.mutable_budgets();
  budgets->Clear();
  plan::OptimiserDecisions* decisions = plan.mutable_optimiser();
  decisions->Clear();
  double predicted = 0;
  for (int layer = 0; layer < layers; ++layer) {
    decisions->set_candidates_measured(decisions->candidates_measured() + int(inputs.measured_settings[layer].size()));
    if (hulls[layer].empty()) continue;
    const Option& option = hulls[layer][chosen[layer]];
    const LayerSetting& setting = option.measured.setting;
    if (setting.bits < 16) {
      auto* entry = quantization->add_layers();
      *entry = inputs.quantization.layers(layer);
      entry->set_layer(layer);
      entry->set_key_bits(setting.bits);
      entry->set_value_bits(setting.bits);
    }
    if (setting.keep_fraction < 1.0f) {
      auto* entry = budgets->add_layers();
      entry->set_layer(layer);
      for (int h = 0; h < kv_heads; ++h) entry->add_head_keep_fraction(setting.keep_fraction);
    }
    auto* decision = decisions->add_layers();
    decision->set_layer(layer);
    decision->set_bits(setting.bits);
    decision->set_keep_fraction(setting.keep_fraction);
    decision->set_predicted_kl(option.measured.kl);
    decision->set_predicted_probe_kl(option.measured.probe_kl);
    decision->set_bytes(option.bytes);
    decision->set_full_bytes(full_bytes[layer]);
    predicted += option.measured.kl;
  }
  decisions->set_predicted_kl(predicted);
  decisions->set_retrieval_weight(inputs.retrieval_weight);
  if (budgets->layers_size() > 0) WriteBudgetPolicy(budget, budgets);
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckMemoryTarget(const plan::Plan& plan) {
  if (MeetsMemoryTarget(plan)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "memory target %.3f not met: at %d tokens the plan keeps %.3f of the full cache; %s", plan.target_memory_ratio(),
      ReferenceContext(plan), AchievedMemoryRatio(plan), ShortfallReason(plan)));
}

int64_t FullCacheBytes(const plan::ModelFingerprint& model, int64_t context) {
  return FullCacheBytes(model.num_layers(), model.num_kv_heads(), model.head_dim(), context);
}

int64_t PlanCacheBytes(const plan::Plan& plan, int64_t context) {
  return CacheBytes(CachePolicyFromPlan(plan), context);
}

LayerPolicy LayerPolicyForSetting(const LayerSetting& setting, const BudgetPolicy& budget, int quantization_window,
                                  int head_dim, int kv_heads) {
  LayerPolicy policy;
  if (setting.bits < 16)
    policy.coding = CodingPolicy{.key_sparsity = QuantizedWords(head_dim, setting.bits),
                                 .value_sparsity = QuantizedWords(head_dim, setting.bits),
                                 .key_bits = setting.bits,
                                 .value_bits = setting.bits,
                                 .recent_window = quantization_window,
                                 .keys_after_rope = true};
  if (setting.keep_fraction < 1.0f) {
    policy.budget = budget;
    policy.budget->head_keep_fraction.assign(kv_heads, setting.keep_fraction);
  }
  return policy;
}

absl::StatusOr<plan::Plan> CompilePlan(const PlannerInputs& inputs) {
  plan::Plan plan;
  plan.set_format_version(kPlanFormatVersion);
  *plan.mutable_model() = inputs.model;
  *plan.mutable_calibration() = inputs.calibration;
  plan.set_target_memory_ratio(inputs.target_memory_ratio);
  plan.set_reference_context(inputs.reference_context);
  *plan.mutable_sharing() = inputs.sharing;
  *plan.mutable_sparse_coding() = inputs.sparse_coding;
  const int layers = inputs.model.num_layers(), kv_heads = inputs.model.num_kv_heads();
  const std::set<int> sharers = Sharers(plan);
  // A sharer stores nothing, so it quantizes nothing.
  *plan.mutable_quantization() = inputs.quantization;
  auto* quantized = plan.mutable_quantization()->mutable_layers();
  quantized->erase(std::remove_if(quantized->begin(), quantized->end(),
                                  [&](const auto& entry) { return sharers.contains(entry.layer()); }),
                   quantized->end());

  if (inputs.refresh) {
    plan::RefreshSchedule* refresh = plan.mutable_refresh();
    WriteRefreshPolicy(inputs.refresh_policy, refresh);
    for (int layer = 0; layer < layers; ++layer)
      if (!sharers.contains(layer)) refresh->add_layers(layer);
  }

  if (!inputs.measured_settings.empty()) {
    KVPLAN_RETURN_IF_ERROR(ChooseMeasuredSettings(inputs, sharers, plan));
  } else if (!inputs.attention_coverage.empty()) {
    if (int(inputs.attention_coverage.size()) != layers)
      return absl::InvalidArgumentError("attention coverage must list every layer");
    const BudgetSettings& settings = inputs.budget_settings;
    plan::TokenBudgets* budgets = plan.mutable_budgets();
    WriteBudgetPolicy(settings.policy, budgets);
    const std::set<int> exempt(settings.exempt_layers.begin(), settings.exempt_layers.end());
    std::vector<int> budgeted;
    for (int layer = 0; layer < layers; ++layer)
      if (!exempt.contains(layer) && !sharers.contains(layer)) budgeted.push_back(layer);
    // Heads whose attention is spread over more of the context get proportionally larger budgets.
    double mean_coverage = 0;
    int counted = 0;
    for (int layer : budgeted) {
      for (float coverage : inputs.attention_coverage[layer]) {
        mean_coverage += coverage;
        ++counted;
      }
    }
    mean_coverage = counted ? std::max(mean_coverage / counted, 1e-3) : 1.0;
    auto apply_scale = [&](double scale) {
      budgets->clear_layers();
      for (int layer : budgeted) {
        auto* layer_budget = budgets->add_layers();
        layer_budget->set_layer(layer);
        for (int h = 0; h < kv_heads; ++h) {
          const double weight = inputs.attention_coverage[layer][h] / mean_coverage;
          layer_budget->add_head_keep_fraction(float(std::clamp(scale * weight, 0.005, 1.0)));
        }
      }
    };
    const double target_bytes = inputs.target_memory_ratio * FullCacheBytes(inputs.model, inputs.reference_context);
    // The scale at which even the least-covered head keeps everything: no eviction beyond what the target needs.
    double min_weight = 1.0;
    for (int layer : budgeted)
      for (float coverage : inputs.attention_coverage[layer])
        min_weight = std::min(min_weight, std::max(coverage / mean_coverage, 1e-3));
    double low = 0.0, high = 1.0 / min_weight;
    apply_scale(high);
    if (PlanCacheBytes(plan, inputs.reference_context) > target_bytes) {
      for (int iteration = 0; iteration < 40; ++iteration) {
        const double middle = (low + high) / 2;
        apply_scale(middle);
        (PlanCacheBytes(plan, inputs.reference_context) > target_bytes ? high : low) = middle;
      }
      apply_scale(std::max(low, 1e-4));
    }
  }
  RecordEstimates(plan);
  KVPLAN_RETURN_IF_ERROR(ValidatePlanStructure(plan));
  return plan;
}

std::string DescribePlan(const plan::Plan& plan, const std::vector<int>& contexts) {
  const plan::ModelFingerprint& model = plan.model();
  std::string out = absl::StrFormat(
      "kvplan plan (format %d)\nmodel: %s, %d layers, %d heads / %d KV heads, head_dim %d, vocab %d, weights %016x\n",
      plan.format_version(), model.architecture(), model.num_layers(), model.num_heads(), model.num_kv_heads(),
      model.head_dim(), model.vocab_size(), model.weights_hash());
  const plan::CalibrationInfo& calibration = plan.calibration();
  absl::StrAppendFormat(&out, "calibration: %s, %d sequences x %d tokens (%d tokens)\n", calibration.data_path(),
                        calibration.sequences(), calibration.sequence_length(), calibration.tokens());
  absl::StrAppendFormat(&out, "target memory: %.3f of the full cache\n\n", plan.target_memory_ratio());

  out += "layer sharing (KVSharer):";
  if (plan.sharing().shares_size() == 0) out += " none";
  out += "\n";
  for (const auto& share : plan.sharing().shares())
    absl::StrAppendFormat(
        &out, "  layer %d reuses layer %d's cache (layer distance %.3f, hidden cosine %.4f >= %.2f)\n", share.layer(),
        share.donor(), share.layer_distance(), share.hidden_cosine(), plan.sharing().cosine_threshold());

  const plan::SparseCoding& coding = plan.sparse_coding();
  if (Heading(out, "sparse coding (CSR):", coding.layers_size() > 0))
    absl::StrAppendFormat(&out,
                          " keys %d atoms/vector (coded %s RoPE), values %d, newest %d tokens uncoded (%.2f "
                          "bits/channel)\n",
                          coding.key_sparsity(), coding.keys_coded_after_rope() ? "after" : "before",
                          coding.value_sparsity(), coding.recent_window(),
                          32.0 * (coding.key_sparsity() + coding.value_sparsity()) / (2.0 * model.head_dim()));
  for (const auto& entry : coding.layers())
    absl::StrAppendFormat(&out, "  layer %d: %d atoms; relative error keys %.3f values %.3f\n", entry.layer(),
                          entry.keys().atoms(), entry.keys().relative_error(), entry.values().relative_error());

  const plan::KvQuantization& quantization = plan.quantization();
  if (Heading(out, "quantization (KIVI-style, per token, key channels scaled):", quantization.layers_size() > 0))
    absl::StrAppendFormat(&out, " newest %d tokens in bf16\n", quantization.recent_window());
  for (const auto& entry : quantization.layers())
    absl::StrAppendFormat(&out, "  layer %d: keys %d bits, values %d bits (%.2f bits/channel with scales)\n",
                          entry.layer(), entry.key_bits(), entry.value_bits(),
                          16.0 *
                              (QuantizedWords(model.head_dim(), entry.key_bits()) +
                               QuantizedWords(model.head_dim(), entry.value_bits())) /
                              model.head_dim());

  const plan::TokenBudgets& budgets = plan.budgets();
  if (Heading(out, "token budgets:", budgets.layers_size() > 0))
    absl::StrAppendFormat(&out, " %s scoring, %d sinks, %d recent, min %d tokens, %s\n",
                          plan::TokenBudgets::Scoring_Name(budgets.scoring()), budgets.sink_tokens(),
                          budgets.recent_window(), budgets.min_tokens(),
                          budgets.merge_evicted() ? absl::StrFormat("evicted tokens merged (ZeroMerge, alpha %.2f)",
                                                                    budgets.merge_compensation())
                                                  : std::string("evicted tokens dropped"));
  for (const auto& layer : budgets.layers()) {
    std::vector<std::string> fractions;
    for (float fraction : layer.head_keep_fraction()) fractions.push_back(absl::StrFormat("%.3f", fraction));
    absl::StrAppendFormat(&out, "  layer %d keeps per KV head: %s of the context\n", layer.layer(),
                          absl::StrJoin(fractions, " "));
  }

  const plan::RefreshSchedule& refresh = plan.refresh();
  if (Heading(out, "refresh (RefreshKV):", refresh.layers_size() > 0))
    absl::StrAppendFormat(&out,
                          " small cache %.3f of the context (min %d), full attention every %d steps or when query "
                          "cosine < %.2f, pooling %d; layers %s\n",
                          refresh.small_cache_fraction(), refresh.min_small_cache_tokens(), refresh.refresh_stride(),
                          refresh.query_similarity_threshold(), refresh.pool_kernel(),
                          absl::StrJoin(refresh.layers(), ","));

  const plan::OptimiserDecisions& optimiser = plan.optimiser();
  if (Heading(out, "quality optimiser:", optimiser.layers_size() > 0))
    absl::StrAppendFormat(&out,
                          " %d settings measured, loss = KL + %.3f x retrieval-probe KL; predicted KL %.4f "
                          "nats/token (sum of the layers'), verified %.4f with top-1 agreement %.2f%% over %d "
                          "held-back tokens; retrieval probes: KL %.4f, answer agreement %.2f%%\n",
                          optimiser.candidates_measured(), optimiser.retrieval_weight(), optimiser.predicted_kl(),
                          optimiser.verified_kl(), 100 * optimiser.verified_top1_agreement(),
                          optimiser.verified_tokens(), optimiser.verified_probe_kl(),
                          100 * optimiser.verified_probe_top1_agreement());
  for (const auto& decision : optimiser.layers())
    absl::StrAppendFormat(&out,
                          "  layer %2d: %-4s keep %.3f  predicted KL %.5f, probe KL %.4f  %s of %s at %d tokens\n",
                          decision.layer(), decision.bits() < 16 ? absl::StrCat("int", decision.bits()) : "bf16",
                          decision.keep_fraction(), decision.predicted_kl(), decision.predicted_probe_kl(),
                          Bytes(decision.bytes()), Bytes(decision.full_bytes()), ReferenceContext(plan));

  if (plan.target_memory_ratio() > 0 && plan.memory_size() > 0)
    absl::StrAppendFormat(&out, "\nat %d tokens the plan keeps %.3f of the full cache: target %.3f %s\n",
                          ReferenceContext(plan), AchievedMemoryRatio(plan), plan.target_memory_ratio(),
                          MeetsMemoryTarget(plan) ? "met" : absl::StrCat("NOT met (", ShortfallReason(plan), ")"));
  out += "\nKV memory (bf16 full cache vs plan):\n";
  absl::StrAppendFormat(&out, "  %8s %14s %14s %8s\n", "context", "full", "plan", "ratio");
  std::vector<int> rows = contexts;
  if (rows.empty())
    for (const auto& estimate : plan.memory()) rows.push_back(estimate.context());
  for (int context : rows) {
    const int64_t full = FullCacheBytes(plan.model(), context), planned = PlanCacheBytes(plan, context);
    absl::StrAppendFormat(&out, "  %8d %14s %14s %7.2fx\n", context, Bytes(full), Bytes(planned),
                          double(full) / std::max<int64_t>(1, planned));
  }
  return out;
}

absl::StatusOr<std::string> PlanToJson(const plan::Plan& plan, bool include_atoms) {
  plan::Plan copy = plan;
  if (!include_atoms)
    for (auto& entry : *copy.mutable_sparse_coding()->mutable_layers()) {
      entry.mutable_keys()->clear_values();
      entry.mutable_values()->clear_values();
    }
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  const auto status = google::protobuf::util::MessageToJsonString(copy, &json, options);
  if (!status.ok()) return absl::InternalError(std::string(status.message()));
  return json;
}

}  // namespace kvplan
