#include "runtime/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvplan {
namespace {

int32_t FirstMaximum(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// A uniform double in [0, 1) from the generator's top 53 bits: the same value on every standard library
// (std::uniform_real_distribution's algorithm is implementation-defined).
double UniformUnit(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

}  // namespace

absl::Status ValidateSamplingSettings(const SamplingSettings& settings) {
  if (!std::isfinite(settings.temperature) || settings.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0 (0: greedy), got ", settings.temperature));
  }
  if (settings.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0 (0: every token), got ", settings.top_k));
  }
  if (!(settings.top_p > 0 && settings.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must lie in (0, 1], got ", settings.top_p));
  }
  return absl::OkStatus();
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingSettings& settings) {
  if (absl::Status status = ValidateSamplingSettings(settings); !status.ok()) return status;
  return Sampler(settings);
}

absl::StatusOr<int32_t> Sampler::Sample(std::span<const float> logits) {
  if (logits.empty()) return absl::InvalidArgumentError("cannot sample from an empty row of logits");
  if (greedy()) return FirstMaximum(logits);

  candidates_.clear();
  for (size_t token = 0; token < logits.size(); ++token) {
    if (!std::isnan(logits[token])) candidates_.emplace_back(logits[token], int32_t(token));
  }
  if (candidates_.empty()) return absl::InvalidArgumentError("every logit of the row is NaN");
  auto more_likely = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t kept = candidates_.size();
  if (settings_.top_k > 0 && size_t(settings_.top_k) < kept) kept = size_t(settings_.top_k);
  // Sorting is needed only to cut by rank or by cumulative probability.
  if (kept < candidates_.size() || settings_.top_p < 1) {
    std::partial_sort(candidates_.begin(), candidates_.begin() + kept, candidates_.end(), more_likely);
    candidates_.resize(kept);
  }

  float max_logit = -std::numeric_limits<float>::infinity();
  for (const auto& [logit, token] : candidates_) max_logit = std::max(max_logit, logit);
  if (std::isinf(max_logit)) {  // every weight would be 0 or infinite: the first token at the extreme
    for (const auto& [logit, token] : candidates_) {
      if (logit == max_logit) return token;
    }
  }
  double total = 0;
  for (auto& [weight, token] : candidates_) {
    weight = float(std::exp(double(weight - max_logit) / settings_.temperature));
    total += weight;
  }
  if (settings_.top_p < 1) {
    // The smallest prefix (most likely first) holding top_p of the mass; the most likely token always stays.
    double mass = 0;
    size_t prefix = 0;
    while (prefix < candidates_.size() && (prefix == 0 || mass < settings_.top_p * total))
      mass += candidates_[prefix++].first;
    candidates_.resize(prefix);
    total = mass;
  }

  double target = UniformUnit(rng_) * total;
  for (const auto& [weight, token] : candidates_) {
    if (target < weight) return token;
    target -= weight;
  }
  return candidates_.back().second;  // rounding left the target just past the last weight
}

}  // namespace kvplan
