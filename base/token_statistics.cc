#include "base/token_statistics.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace kvplan {

LogitRow::LogitRow(const float* logits, int vocab) : logits(logits), vocab(vocab) {
  const float max_logit = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - max_logit);
  log_partition = max_logit + std::log(sum);
}

double NegativeLogLikelihood(const LogitRow& row, int32_t target) { return row.log_partition - row.logits[target]; }

double KlDivergence(const LogitRow& reference, const LogitRow& row) {
  // Σ p (log p − log q) = Σ p (reference − row) − (log Z_reference − log Z_row), since Σ p = 1.
  double expected_gap = 0;
  for (int i = 0; i < reference.vocab; ++i) {
    const double probability = std::exp(double(reference.logits[i]) - reference.log_partition);
    expected_gap += probability * (double(reference.logits[i]) - row.logits[i]);
  }
  // Rounding can leave a tiny negative value where the distributions agree; KL itself is never negative.
  return std::max(0.0, expected_gap - reference.log_partition + row.log_partition);
}

int32_t Argmax(const float* logits, int vocab) { return int32_t(std::max_element(logits, logits + vocab) - logits); }

void MeanEstimate::Add(double value) {
  ++count_;
  const double delta = value - mean_;
  mean_ += delta / count_;
  squared_deviations_ += delta * (value - mean_);
}

double MeanEstimate::standard_error() const {
  if (count_ < 2) return std::numeric_limits<double>::quiet_NaN();
  return std::sqrt(squared_deviations_ / (count_ - 1) / count_);
}

double Quantile(std::vector<double> values, double fraction) {
  std::sort(values.begin(), values.end());
  const double position = std::clamp(fraction, 0.0, 1.0) * double(values.size() - 1);
  const size_t below = size_t(position);
  const size_t above = std::min(below + 1, values.size() - 1);
  return values[below] + (position - double(below)) * (values[above] - values[below]);
}

}  // namespace kvplan
