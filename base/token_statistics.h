// Per-token statistics of next-token distributions, as llama-perplexity reports them: negative log-likelihood,
// KL divergence from a reference distribution, means with their standard errors, and quantiles. Sums run in
// double: a vocabulary of fp32 logits has many tiny probabilities, and KL values of close models are small
// differences of large log-partitions.
#pragma once

#include <cstdint>
#include <vector>

namespace kvplan {

// One row of logits with its log-partition log Σ exp(logits), computed once for every score taken from it.
struct LogitRow {
  LogitRow(const float* logits, int vocab);
  const float* logits;  // [vocab]
  int vocab;
  double log_partition;
};

// −log softmax(row)[target]
double NegativeLogLikelihood(const LogitRow& row, int32_t target);

// KL(P ‖ Q) = Σ p (log p − log q) with P = softmax(reference), Q = softmax(row); both of one vocabulary.
double KlDivergence(const LogitRow& reference, const LogitRow& row);

// The first index of the largest of `vocab` logits: the greedy next token.
int32_t Argmax(const float* logits, int vocab);

// The mean of a stream of values and its standard error (sample standard deviation / sqrt(count)), updated by
// Welford's method so that a long stream of similar values keeps its variance.
class MeanEstimate {
 public:
  void Add(double value);
  int64_t count() const { return count_; }
  double mean() const { return mean_; }
  // NaN (JSON null) below two values, where the spread is unknown.
  double standard_error() const;

 private:
  int64_t count_ = 0;
  double mean_ = 0;
  double squared_deviations_ = 0;  // Σ (value − mean)²
};

// The `fraction` quantile of `values` (not empty), interpolating linearly between neighbouring order statistics
// as llama-perplexity does.
double Quantile(std::vector<double> values, double fraction);

}  // namespace kvplan
