// What a cache plan costs in next-token distributions: calibration text and retrieval probes run under the plan
// and compared with the full cache (base/logit_comparison.h), for the optimiser's measurements and the plan's
// verification.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/tokenizer.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/model.h"

namespace kvplan {

// A sequence whose next-token distributions are compared on rows [scored_begin, scored_end).
struct ScoredSequence {
  std::vector<int32_t> tokens;
  int scored_begin = 0, scored_end = 0;
};

// What a plan's loss is measured on: calibration text, and retrieval probes in it (none: text alone).
struct PlanLossSequences {
  std::vector<ScoredSequence> text, probes;
};

std::vector<ScoredSequence> WhollyScored(const std::vector<std::vector<int32_t>>& sequences);

// Retrieval probes: calibration text with a pass-key sentence hidden at depths spread evenly over the probes and
// the question at the end; only the rows that predict the answer's tokens are scored, so a setting that loses the
// key shows there. The haystack is calibration text, unlike eval's needle filler, and the keys are others.
absl::StatusOr<std::vector<ScoredSequence>> RetrievalProbes(const Tokenizer& tokenizer,
                                                            const std::vector<std::vector<int32_t>>& haystacks,
                                                            int count);

// Next-token distributions of sequences under one cache plan, compared with the full cache's.
class DistributionComparison {
 public:
  DistributionComparison(Model& model, std::vector<ScoredSequence> sequences)
      : model_(model), sequences_(std::move(sequences)) {}

  // The full cache's logits on the scored rows, kept for every later comparison.
  absl::Status RunReference();

  struct Result {
    double kl = 0, top1_agreement = 0;
    int64_t tokens = 0;
  };
  // Mean KL divergence per scored row from the reference, and how often both pick the same next token; under the
  // policies the model was last given. A non-finite row is an error naming it and the device.
  absl::StatusOr<Result> Compare();
  bool empty() const { return sequences_.empty(); }

 private:
  absl::StatusOr<std::vector<float>> ScoredLogits(const ScoredSequence& sequence);

  Model& model_;
  std::vector<ScoredSequence> sequences_;
  std::vector<std::vector<float>> reference_;
};

// Text and retrieval probes compared together: what one plan costs on each.
struct PlanLoss {
  DistributionComparison::Result text, probes;
};
class PlanLossMeter {
 public:
  PlanLossMeter(Model& model, PlanLossSequences sequences)
      : model_(model), text_(model, std::move(sequences.text)), probes_(model, std::move(sequences.probes)) {}
  absl::Status RunReference();
  // Gives the model `policies` and compares.
  absl::StatusOr<PlanLoss> Measure(std::shared_ptr<const PlanPolicies> policies);

 private:
  Model& model_;
  DistributionComparison text_, probes_;
};

}  // namespace kvplan
