// A sweep's rows as a CSV table for scripts, a text table for the terminal and an SVG plot for people choosing a
// plan: KV reduction against the perplexity cost and against needle accuracy, one line per method.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "sweep/sweep.h"

namespace kvplan {

// The perplexity change from the full cache, in percent.
double PerplexityDeltaPercent(const SweepPoint& point, const SweepPoint& full_cache);
// Correct answers over trials, all needle contexts together; unset without trials.
std::optional<double> NeedleAccuracy(const SweepPoint& point);

// A header row, the full cache's row, then one row per point:
//   method, target, meets_target (true/false), context, kv_bytes, full_kv_bytes, kv_reduction, perplexity,
//   perplexity_se, delta_perplexity_pct, kl_mean, kl_se, top1_agreement, top1_se, then per needle context L
//   needle_L and full_needle_L (accuracies in [0, 1]), then calibration_s, eval_s.
// Measurements not taken (the full cache's divergence from itself, a standard error of one token) are empty.
std::string SweepCsv(const SweepResult& result);

// One line per row, aligned.
std::string SweepText(const SweepResult& result);

// Two panels side by side, x the KV reduction on a log2 scale (at least 1x to 32x): y the perplexity change in
// percent, and y the needle accuracy. Each method is one polyline with a marker per target in each panel; the
// full cache is a dashed line; a legend names the methods.
std::string SweepSvg(const SweepResult& result);

// Whether an existing file holds what SweepCsv or SweepSvg write, so a sweep may replace it without --force.
bool IsSweepCsv(std::string_view text);
bool IsSweepSvg(std::string_view text);

}  // namespace kvplan
