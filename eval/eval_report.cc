#include "eval/eval_report.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace kvplan {
namespace {

// Keys keep the order they are written in, so schema_version leads.
using Json = nlohmann::ordered_json;

Json PerplexityJson(const PerplexityResult& result) {
  return {{"value", result.perplexity},
          {"standard_error", result.standard_error},
          {"mean_nll", result.mean_nll},
          {"scored_tokens", result.scored_tokens},
          {"windows", result.windows}};
}

Json NeedleJson(const NeedleResult& result) {
  Json entry = {{"context_length", result.context_length},
                {"correct", result.correct},
                {"trials", result.trials},
                {"accuracy", result.accuracy()}};
  if (result.reference_correct) entry["reference_correct"] = *result.reference_correct;
  return entry;
}

}  // namespace

std::string EvalReportJson(const EvalReport& report) {
  Json json = {{"schema_version", kEvalReportSchemaVersion},
               {"device", report.device},
               {"plan", report.plan_path.empty() ? Json(nullptr) : Json(report.plan_path)},
               {"wall_seconds", report.wall_seconds}};
  if (report.perplexity) json["perplexity"] = PerplexityJson(*report.perplexity);
  if (report.reference_perplexity) json["reference"] = {{"perplexity", PerplexityJson(*report.reference_perplexity)}};
  if (report.divergence) {
    const DivergenceResult& divergence = *report.divergence;
    json["kl_divergence"] = {{"mean", divergence.kl_mean},
                             {"standard_error", divergence.kl_standard_error},
                             {"p99", divergence.kl_p99},
                             {"max", divergence.kl_max}};
    json["top1_agreement"] = {{"value", divergence.top1_agreement}, {"standard_error", divergence.top1_standard_error}};
  }
  if (!report.needle.empty()) {
    json["needle"] = Json::array();
    for (const NeedleResult& result : report.needle) json["needle"].push_back(NeedleJson(result));
  }
  json["cached_positions"] = report.cached_positions;
  json["kv_bytes"] = report.kv_bytes;
  json["full_kv_bytes"] = report.full_kv_bytes;
  return json.dump();
}

std::string EvalReportText(const EvalReport& report) {
  std::string text;
  if (report.perplexity) {
    const PerplexityResult& result = *report.perplexity;
    absl::StrAppendFormat(&text, "held-out perplexity %.4f ± %.4f over %d tokens (%d windows)", result.perplexity,
                          result.standard_error, result.scored_tokens, result.windows);
    if (report.reference_perplexity)
      absl::StrAppendFormat(&text, "; full cache %.4f ± %.4f", report.reference_perplexity->perplexity,
                            report.reference_perplexity->standard_error);
    text += "\n";
  }
  if (report.divergence) {
    const DivergenceResult& divergence = *report.divergence;
    absl::StrAppendFormat(&text,
                          "KL divergence from the full cache %.6f ± %.6f nats/token (p99 %.4f, max %.4f); "
                          "top-1 agreement %.2f ± %.2f%%\n",
                          divergence.kl_mean, divergence.kl_standard_error, divergence.kl_p99, divergence.kl_max,
                          100 * divergence.top1_agreement, 100 * divergence.top1_standard_error);
  }
  for (const NeedleResult& result : report.needle) {
    absl::StrAppendFormat(&text, "needle @%d: %d/%d = %.3f", result.context_length, result.correct, result.trials,
                          result.accuracy());
    if (result.reference_correct)
      absl::StrAppendFormat(&text, " (full cache %d/%d)", *result.reference_correct, result.trials);
    text += "\n";
  }
  // The cache as the last needle trial (or perplexity window) left it, against a full bf16 cache of as many tokens.
  absl::StrAppendFormat(&text, "KV cache at %d tokens: %d bytes (full bf16 cache %d, %.2fx smaller)\n",
                        report.cached_positions, report.kv_bytes, report.full_kv_bytes,
                        double(report.full_kv_bytes) / std::max<int64_t>(1, report.kv_bytes));
  absl::StrAppendFormat(&text, "evaluated in %.1f s\n", report.wall_seconds);
  return text;
}

std::string NeedleTrialsJson(const std::vector<NeedleTrial>& trials) {
  Json json = Json::array();
  for (const NeedleTrial& trial : trials)
    json.push_back({{"length", trial.context_length}, {"key", trial.pass_key}, {"ids", trial.prompt}});
  return json.dump();
}

}  // namespace kvplan
