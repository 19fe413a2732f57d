// `kvplan sweep`: calibrates a plan for every (method preset, memory target) pair and judges each against the
// full cache under one protocol (eval/evaluate.h), so a user can see what each KV reduction costs before choosing
// a plan. Plans stay in memory; the results are rows (sweep/sweep_report.h writes them as CSV and a plot).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "eval/evaluate.h"

namespace kvplan {

// A named way of calibrating: which methods, with which settings. The presets are one table in sweep.cc; a new
// method is one more line there.
struct SweepMethod {
  const char* name;
  const char* description;
  void (*configure)(CalibrateOptions& options);  // sets methods and method settings; leaves the rest as given
};
std::span<const SweepMethod> SweepMethods();
// The preset called `name`; InvalidArgument naming it, and the known ones, when there is none.
absl::StatusOr<SweepMethod> FindSweepMethod(const std::string& name);

struct SweepOptions {
  // The model, calibration data, device and every method's settings. Each point sets its methods (the preset),
  // its target_memory_ratio and reference_context (perplexity.window) on a copy.
  CalibrateOptions calibration;
  std::string eval_data_path;
  std::vector<std::string> methods = {"budget-l2", "csr+budget"};  // SweepMethods() names, in row order
  std::vector<float> targets = {0.5f, 0.25f, 0.2f, 0.1f};          // plan bytes / full-cache bytes, each in (0, 1]
  // The window is also the context every target is met at and every reduction is measured at.
  PerplexityOptions perplexity = {.window = 2048, .max_tokens = 16384};
  NeedleOptions needle = {.context_lengths = {2048}, .trials = 20};
};

// One row: a plan (or the full cache) and how it did.
struct SweepPoint {
  std::string method;  // a SweepMethods() name, or kFullCacheMethod
  float target = 1;    // the memory ratio asked for; 1 for the full cache
  bool meets_target = true;
  // K/V bytes of one sequence at the perplexity window: the plan's own estimate (plans/cache_policy.h, which the
  // runtime holds exactly) and the full bf16 cache's.
  int64_t kv_bytes = 0;
  int64_t full_kv_bytes = 0;
  PerplexityResult perplexity;
  std::optional<DivergenceResult> divergence;  // from the full cache; unset on the full cache's row
  std::vector<NeedleResult> needle;            // reference_correct: the full cache's count on the same trials
  double calibration_seconds = 0;  // the point's calibration stages; the session is opened once, before them
  double eval_seconds = 0;

  double kv_reduction() const { return kv_bytes > 0 ? double(full_kv_bytes) / kv_bytes : 0.0; }
};
inline constexpr char kFullCacheMethod[] = "full";

struct SweepResult {
  std::string model_dir;
  std::string device;
  int context = 0;  // the perplexity window
  SweepPoint full_cache;
  std::vector<SweepPoint> points;  // methods in the order given, each with its targets in the order given
};

// Opens one calibration session (calibrate/session.h: the checkpoint, its tokenizer and the calibration data's
// sequences), runs the full cache once (perplexity, needle), then calibrates over the session and evaluates every
// (method, target) point. Evaluation builds its two models once (the full cache, and one that switches to each
// point's plan) on the session's weights; each point's calibration builds its own runtime model. KL divergence and
// top-1 agreement need the full cache's logits beside each plan's, so its windows run again with every point (keeping
// them would take tokens × vocabulary floats); its needle trials do not. `progress` gets stages named "<point>:
// <stage>", e.g. "[2/8] csr+budget at 0.25: dictionaries", after "calibration data: loading the model".
// InvalidArgument, before any work, for an unknown method (named), no methods or targets, a target outside (0, 1]
// or no evaluation data; then the errors of loading the model and data, of Calibrate and of the evaluations
// (eval data shorter than one window, say) pass through.
absl::StatusOr<SweepResult> Sweep(const SweepOptions& options, const StageProgressCallback& progress = nullptr);

}  // namespace kvplan
