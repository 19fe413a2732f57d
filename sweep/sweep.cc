#include "sweep/sweep.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "calibrate/session.h"
#include "loader/open_model.h"
#include "loader/tokenizer.h"
#include "planner/planner.h"
#include "runtime/backend.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

using plan::TokenBudgets;
using enum CalibrationMethod;

// Every preset states its methods and, where budgets are among them, their scoring, so it means the same whatever
// the base options say. L2-norm eviction hurts the first layers (Devoto et al.), so L2 budgets exempt layers 0-1
// (the planner's default); attention scores protect what those layers need and exempt none (bench/RESULTS.md).
template <typename... Method>
void Use(CalibrateOptions& options, Method... methods) {
  options.methods = {methods...};
  options.budget_settings.policy.scoring = TokenBudgets::KEY_L2_NORM;
  options.budget_settings.exempt_layers = BudgetSettings().exempt_layers;
}
template <typename... Method>
void UseAttention(CalibrateOptions& options, Method... methods) {
  Use(options, methods...);
  options.budget_settings.policy.scoring = TokenBudgets::ATTENTION_SCORE;
  options.budget_settings.exempt_layers.clear();
}

void Quantize(CalibrateOptions& options, int bits) {
  Use(options, kQuant);
  options.key_bits = options.value_bits = bits;
}

const SweepMethod kSweepMethods[] = {
    {"share", "KVSharer layer sharing", [](CalibrateOptions& o) { Use(o, kShare); }},
    {"csr", "CSR sparse coding", [](CalibrateOptions& o) { Use(o, kDict); }},
    {"budget-l2", "token budgets, L2 key norms, layers 0-1 exempt", [](CalibrateOptions& o) { Use(o, kBudget); }},
    {"budget-attn", "token budgets, attention scores", [](CalibrateOptions& o) { UseAttention(o, kBudget); }},
    {"csr+budget", "csr and budget-attn", [](CalibrateOptions& o) { UseAttention(o, kDict, kBudget); }},
    {"refresh", "RefreshKV", [](CalibrateOptions& o) { Use(o, kRefresh); }},
    {"all", "share, csr, budget-attn and refresh together",
     [](CalibrateOptions& o) { UseAttention(o, kShare, kDict, kBudget, kRefresh); }},
    {"quant8", "KIVI-style 8-bit keys and values", [](CalibrateOptions& o) { Quantize(o, 8); }},
    {"quant4", "KIVI-style 4-bit keys and values", [](CalibrateOptions& o) { Quantize(o, 4); }},
    {"quant2", "KIVI-style 2-bit keys and values", [](CalibrateOptions& o) { Quantize(o, 2); }},
    {"optimise", "quantization and attention-scored budgets chosen per layer by measured loss",
     [](CalibrateOptions& o) { UseAttention(o, kOptimise); }},
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::Status CheckOptions(const SweepOptions& options) {
  if (options.methods.empty()) return absl::InvalidArgumentError("a sweep needs at least one method");
  for (const std::string& method : options.methods) KVPLAN_RETURN_IF_ERROR(FindSweepMethod(method).status());
  if (options.targets.empty()) return absl::InvalidArgumentError("a sweep needs at least one memory target");
  for (float target : options.targets)
    if (!(target > 0.0f && target <= 1.0f))
      return absl::InvalidArgumentError(
          absl::StrCat("memory target ", target, " is not in (0, 1]: the plan's bytes over the full cache's"));
  if (options.eval_data_path.empty()) return absl::InvalidArgumentError("a sweep needs evaluation data");
  return absl::OkStatus();
}

// Reports a point's stages as "<label>: <stage>".
StageProgressCallback Labelled(const StageProgressCallback& progress, const std::string& label) {
  if (!progress) return nullptr;
  return [&progress, label](const std::string& stage, int64_t done, int64_t total) {
    progress(absl::StrCat(label, ": ", stage), done, total);
  };
}
ProgressCallback Stage(const StageProgressCallback& progress, const std::string& stage) {
  if (!progress) return nullptr;
  return [&progress, stage](int64_t done, int64_t total) { progress(stage, done, total); };
}

// The calibration session every point calibrates over: the checkpoint opened and the calibration data tokenized
// once, as the stage "calibration data: loading the model".
absl::StatusOr<std::unique_ptr<CalibrationSession>> OpenSession(const CalibrateOptions& calibration,
                                                                const StageProgressCallback& progress) {
  const StageProgressCallback labelled = Labelled(progress, "calibration data");
  CalibrationReport opening;
  StageClock clock(labelled, opening, ResolveBackend(calibration.device) == Backend::kCuda);
  return CalibrationSession::Open(calibration, clock);
}

}  // namespace

std::span<const SweepMethod> SweepMethods() { return kSweepMethods; }

absl::StatusOr<SweepMethod> FindSweepMethod(const std::string& name) {
  for (const SweepMethod& method : kSweepMethods)
    if (method.name == name) return method;
  std::vector<std::string> known;
  for (const SweepMethod& method : kSweepMethods) known.push_back(method.name);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown sweep method \"", name, "\" (known: ", absl::StrJoin(known, ", "), ")"));
}

absl::StatusOr<SweepResult> Sweep(const SweepOptions& options, const StageProgressCallback& progress) {
  KVPLAN_RETURN_IF_ERROR(CheckOptions(options));
  const int context = options.perplexity.window;
  KVPLAN_ASSIGN_OR_RETURN(const std::unique_ptr<CalibrationSession> session,
                          OpenSession(options.calibration, progress));
  const LoadedModel& loaded = session->model();
  const ModelConfig& config = loaded.config;
  const Tokenizer& tokenizer = *loaded.tokenizer;
  KVPLAN_ASSIGN_OR_RETURN(const std::vector<int32_t> tokens,
                          loaded.EncodeDataFile(options.eval_data_path, options.perplexity.max_tokens));

  int capacity = context;
  for (int length : options.needle.context_lengths) capacity = std::max(capacity, length);
  const ModelOptions full_cache = {.backend = options.calibration.device, .capacity = capacity, .max_rows = capacity};
  KVPLAN_ASSIGN_OR_RETURN(auto reference, CreateModel(config, *loaded.weights, full_cache));
  KVPLAN_ASSIGN_OR_RETURN(auto planned, CreateModel(config, *loaded.weights, full_cache));

  SweepResult result = {
      .model_dir = options.calibration.model_dir, .device = reference->device_name(), .context = context};
  SweepPoint& full = result.full_cache;
  full.method = kFullCacheMethod;
  full.kv_bytes = full.full_kv_bytes = FullCacheBytes(config.num_layers, config.num_kv_heads, config.head_dim, context);
  auto start = std::chrono::steady_clock::now();
  KVPLAN_ASSIGN_OR_RETURN(full.perplexity, EvaluatePerplexity(*reference, tokens, options.perplexity,
                                                              Stage(progress, "full cache: perplexity")));
  KVPLAN_ASSIGN_OR_RETURN(full.needle,
                          EvaluateNeedle(*reference, tokenizer, options.needle, Stage(progress, "full cache: needle")));
  for (NeedleResult& needle : full.needle) needle.reference_correct = needle.correct;
  full.eval_seconds = SecondsSince(start);

  const size_t total = options.methods.size() * options.targets.size();
  for (const std::string& name : options.methods) {
    KVPLAN_ASSIGN_OR_RETURN(const SweepMethod method, FindSweepMethod(name));
    for (float target : options.targets) {
      SweepPoint point = {.method = name, .target = target};
      const std::string label =
          absl::StrFormat("[%d/%d] %s at %g", result.points.size() + 1, total, name, double(target));
      CalibrateOptions calibration = options.calibration;
      method.configure(calibration);
      calibration.target_memory_ratio = target;
      calibration.reference_context = context;
      start = std::chrono::steady_clock::now();
      KVPLAN_ASSIGN_OR_RETURN(const plan::Plan plan, Calibrate(calibration, *session, Labelled(progress, label)));
      point.calibration_seconds = SecondsSince(start);
      point.meets_target = CheckMemoryTarget(plan).ok();
      point.kv_bytes = PlanCacheBytes(plan, context);
      point.full_kv_bytes = FullCacheBytes(plan.model(), context);

      start = std::chrono::steady_clock::now();
      KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(plan, config, *loaded.weights));
      KVPLAN_RETURN_IF_ERROR(planned->UsePolicies(std::make_shared<const PlanPolicies>(std::move(policies))));
      KVPLAN_ASSIGN_OR_RETURN(const PerplexityComparison compared,
                              ComparePerplexity(*planned, *reference, tokens, options.perplexity,
                                                Stage(progress, absl::StrCat(label, ": perplexity"))));
      point.perplexity = compared.model;
      point.divergence = compared.divergence;
      KVPLAN_ASSIGN_OR_RETURN(point.needle, EvaluateNeedle(*planned, tokenizer, options.needle,
                                                           Stage(progress, absl::StrCat(label, ": needle"))));
      for (size_t i = 0; i < point.needle.size(); ++i) point.needle[i].reference_correct = full.needle[i].correct;
      point.eval_seconds = SecondsSince(start);
      result.points.push_back(std::move(point));
    }
  }
  return result;
}

}  // namespace kvplan
