// `kvplan eval`'s results as JSON for scripts and as text for people: the same numbers in both.
#pragma once

#include <string>
#include <vector>

#include "eval/evaluate.h"

namespace kvplan {

// Bumped when a key changes meaning or moves; adding keys keeps the version.
inline constexpr int kEvalReportSchemaVersion = 1;

// One line of JSON (scripts collect one report per line):
//   {"schema_version": 1, "device", "plan" (null: the full cache), "wall_seconds",
//    "perplexity": {"value", "standard_error", "mean_nll", "scored_tokens", "windows"},
//    "reference": {"perplexity": {...}}, "kl_divergence": {"mean", "standard_error", "p99", "max"},
//    "top1_agreement": {"value", "standard_error"},
//    "needle": [{"context_length", "correct", "trials", "accuracy", "reference_correct"}],
//    "cached_positions", "kv_bytes", "full_kv_bytes"}
// Measurements not taken are left out; a standard error of fewer than two tokens is null.
std::string EvalReportJson(const EvalReport& report);

// A few lines, "value ± standard error" where there is one.
std::string EvalReportText(const EvalReport& report);

// The needle trials as a JSON array of {"length", "key", "ids"}, for replaying them in another implementation.
std::string NeedleTrialsJson(const std::vector<NeedleTrial>& trials);

}  // namespace kvplan
