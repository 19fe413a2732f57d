#include "calibrate/plan_loss.h"

#include <algorithm>
#include <random>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/logit_comparison.h"
#include "base/status_macros.h"

namespace kvplan {

std::vector<ScoredSequence> WhollyScored(const std::vector<std::vector<int32_t>>& sequences) {
  std::vector<ScoredSequence> scored;
  for (const auto& tokens : sequences) scored.push_back({tokens, 0, int(tokens.size())});
  return scored;
}

absl::StatusOr<std::vector<ScoredSequence>> RetrievalProbes(const Tokenizer& tokenizer,
                                                            const std::vector<std::vector<int32_t>>& haystacks,
                                                            int count) {
  std::mt19937 generator(77);
  std::uniform_int_distribution<int> pass_key(10000, 99999);
  std::vector<ScoredSequence> probes;
  for (int i = 0; i < count; ++i) {
    const std::vector<int32_t>& haystack = haystacks[i % haystacks.size()];
    const std::string key = std::to_string(pass_key(generator));
    const std::vector<int32_t> needle =
        tokenizer.Encode(absl::StrCat(" The pass key is ", key, ". Remember it. ", key, " is the pass key."));
    const std::vector<int32_t> question = tokenizer.Encode(" What is the pass key? The pass key is");
    const std::vector<int32_t> answer = tokenizer.Encode(absl::StrCat(" ", key));
    const int64_t tail = int64_t(needle.size() + question.size() + answer.size());
    if (int64_t(haystack.size()) < tail + 16)
      return absl::InvalidArgumentError("calibration sequences are too short for retrieval probes");
    const int64_t filler = int64_t(haystack.size()) - tail;
    const int64_t depth = 1 + (filler - 1) * (2 * i + 1) / (2 * count);  // after BOS
    ScoredSequence probe;
    probe.tokens.assign(haystack.begin(), haystack.begin() + depth);
    probe.tokens.insert(probe.tokens.end(), needle.begin(), needle.end());
    probe.tokens.insert(probe.tokens.end(), haystack.begin() + depth, haystack.begin() + filler);
    probe.tokens.insert(probe.tokens.end(), question.begin(), question.end());
    probe.scored_begin = int(probe.tokens.size()) - 1;  // the row after the question predicts the answer
    probe.tokens.insert(probe.tokens.end(), answer.begin(), answer.end());
    probe.scored_end = int(probe.tokens.size()) - 1;
    probes.push_back(std::move(probe));
  }
  return probes;
}

absl::Status DistributionComparison::RunReference() {
  KVPLAN_RETURN_IF_ERROR(model_.UsePolicies(nullptr));
  reference_.clear();
  for (const ScoredSequence& sequence : sequences_) {
    KVPLAN_ASSIGN_OR_RETURN(auto logits, ScoredLogits(sequence));
    reference_.push_back(std::move(logits));
  }
  return absl::OkStatus();
}

absl::StatusOr<DistributionComparison::Result> DistributionComparison::Compare() {
  const int vocab = model_.config().vocab_size;
  Result result;
  double kl = 0, agreed = 0;
  for (size_t i = 0; i < sequences_.size(); ++i) {
    KVPLAN_ASSIGN_OR_RETURN(auto logits, ScoredLogits(sequences_[i]));
    const int scored_begin = sequences_[i].scored_begin;
    const int64_t rows = sequences_[i].scored_end - scored_begin;
    KVPLAN_ASSIGN_OR_RETURN(const std::vector<RowComparison> compared,
                            CompareLogitRows(reference_[i].data(), logits.data(), rows, vocab, nullptr, [&](int64_t r) {
                              return absl::StrCat("row ", scored_begin + r, " of a calibration sequence on ",
                                                  model_.device_name());
                            }));
    for (const RowComparison& row : compared) {
      kl += row.kl;
      agreed += row.same_top1 ? 1 : 0;
    }
    result.tokens += rows;
  }
  result.kl = kl / std::max<int64_t>(1, result.tokens);
  result.top1_agreement = agreed / std::max<int64_t>(1, result.tokens);
  return result;
}

absl::StatusOr<std::vector<float>> DistributionComparison::ScoredLogits(const ScoredSequence& sequence) {
  model_.Reset();
  KVPLAN_ASSIGN_OR_RETURN(auto logits, model_.Forward(SequenceRows(sequence.tokens, 0, 0), LogitRows::kAll));
  const int64_t vocab = model_.config().vocab_size;
  return std::vector<float>(logits.begin() + sequence.scored_begin * vocab,
                            logits.begin() + sequence.scored_end * vocab);
}

absl::Status PlanLossMeter::RunReference() {
  KVPLAN_RETURN_IF_ERROR(text_.RunReference());
  return probes_.RunReference();
}

absl::StatusOr<PlanLoss> PlanLossMeter::Measure(std::shared_ptr<const PlanPolicies> policies) {
  KVPLAN_RETURN_IF_ERROR(model_.UsePolicies(std::move(policies)));
  PlanLoss loss;
  KVPLAN_ASSIGN_OR_RETURN(loss.text, text_.Compare());
  if (!probes_.empty()) {
    KVPLAN_ASSIGN_OR_RETURN(loss.probes, probes_.Compare());
  }
  return loss;
}

}  // namespace kvplan
