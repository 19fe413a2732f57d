// Picks the next token from one row of logits: greedy, or a draw from the softmax at a temperature, cut to the
// k most likely tokens and to the smallest set holding top_p of the probability. Each sequence owns a Sampler,
// so a seed reproduces that sequence's draws whatever else runs in the batch.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvplan {

struct SamplingSettings {
  float temperature = 1.0f;  // 0: greedy (the first most likely token, as eval's Argmax)
  int top_k = 0;             // 0: every token
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
};

// InvalidArgument naming the setting: a negative or non-finite temperature, a negative top_k, top_p outside (0, 1].
absl::Status ValidateSamplingSettings(const SamplingSettings& settings);

class Sampler {
 public:
  static absl::StatusOr<Sampler> Create(const SamplingSettings& settings);

  // The token drawn from `logits` (one row, vocabulary-sized). InvalidArgument for an empty row.
  absl::StatusOr<int32_t> Sample(std::span<const float> logits);

  bool greedy() const { return settings_.temperature == 0.0f || settings_.top_k == 1; }

 private:
  explicit Sampler(const SamplingSettings& settings) : settings_(settings), rng_(settings.seed) {}

  SamplingSettings settings_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;  // (probability, token), reused between draws
};

}  // namespace kvplan
