// The per-token statistics against values worked out by hand, and the logit comparison built on them.
#include "base/token_statistics.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/logit_comparison.h"
#include "gtest/gtest.h"

namespace kvplan {
namespace {

TEST(TokenStatisticsTest, NegativeLogLikelihoodOfKnownProbabilities) {
  // exp(logits) = 1, 2, 3: probabilities 1/6, 2/6, 3/6.
  const float logits[] = {0.0f, float(std::log(2.0)), float(std::log(3.0))};
  const LogitRow row(logits, 3);
  EXPECT_NEAR(row.log_partition, std::log(6.0), 1e-7);
  EXPECT_NEAR(NegativeLogLikelihood(row, 0), std::log(6.0), 1e-7);
  EXPECT_NEAR(NegativeLogLikelihood(row, 2), std::log(2.0), 1e-7);
  // Large logits neither overflow nor lose the small terms.
  const float large[] = {1000.0f, 1000.0f, 900.0f};
  EXPECT_NEAR(NegativeLogLikelihood(LogitRow(large, 3), 0), std::log(2.0), 1e-12);
}

TEST(TokenStatisticsTest, KlDivergenceOfKnownDistributions) {
  // P = (1/2, 1/2), Q = (1/4, 3/4): KL(P ‖ Q) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3).
  const float uniform[] = {0.0f, 0.0f};
  const float skewed[] = {0.0f, float(std::log(3.0))};
  EXPECT_NEAR(KlDivergence(LogitRow(uniform, 2), LogitRow(skewed, 2)), 0.5 * std::log(4.0 / 3.0), 1e-7);
  // KL(Q ‖ P) = 1/4 log(1/2) + 3/4 log(3/2): the direction matters.
  EXPECT_NEAR(KlDivergence(LogitRow(skewed, 2), LogitRow(uniform, 2)), 0.25 * std::log(0.5) + 0.75 * std::log(1.5),
              1e-7);
  // Softmax ignores a shift of all logits, so a shifted copy is the same distribution.
  const float shifted[] = {5.0f, float(5.0 + std::log(3.0))};
  EXPECT_NEAR(KlDivergence(LogitRow(skewed, 2), LogitRow(shifted, 2)), 0.0, 1e-7);
  EXPECT_EQ(KlDivergence(LogitRow(skewed, 2), LogitRow(skewed, 2)), 0.0);
}

TEST(TokenStatisticsTest, ArgmaxTakesTheFirstOfEqualMaxima) {
  const float logits[] = {1.0f, 3.0f, 3.0f, -2.0f};
  EXPECT_EQ(Argmax(logits, 4), 1);
}

TEST(TokenStatisticsTest, MeanEstimateMatchesTheSampleFormulas) {
  MeanEstimate estimate;
  EXPECT_TRUE(std::isnan(estimate.standard_error()));
  estimate.Add(1);
  EXPECT_TRUE(std::isnan(estimate.standard_error()));  // one value has no spread
  for (double value : {2.0, 3.0, 4.0}) estimate.Add(value);
  EXPECT_EQ(estimate.count(), 4);
  EXPECT_DOUBLE_EQ(estimate.mean(), 2.5);
  // Sample variance Σ (x − 2.5)² / 3 = 5/3; standard error sqrt(5/3 / 4).
  EXPECT_DOUBLE_EQ(estimate.standard_error(), std::sqrt(5.0 / 12.0));
  // A fraction of 0/1 values: the standard error is sqrt(p (1 − p) / (n − 1)), as llama-perplexity prints it.
  MeanEstimate agreement;
  for (int i = 0; i < 10; ++i) agreement.Add(i < 8);
  EXPECT_DOUBLE_EQ(agreement.mean(), 0.8);
  EXPECT_NEAR(agreement.standard_error(), std::sqrt(0.8 * 0.2 / 9), 1e-15);
}

TEST(TokenStatisticsTest, QuantileInterpolatesBetweenOrderStatistics) {
  EXPECT_DOUBLE_EQ(Quantile({5, 1, 4, 2, 3}, 0.5), 3.0);
  EXPECT_DOUBLE_EQ(Quantile({10, 0}, 0.99), 9.9);
  EXPECT_DOUBLE_EQ(Quantile({10, 0, 7}, 1.0), 10.0);
  EXPECT_DOUBLE_EQ(Quantile({10, 0, 7}, 0.0), 0.0);
  EXPECT_DOUBLE_EQ(Quantile({4}, 0.99), 4.0);
}

// eval --plan and the optimiser compare logits through this one function: a NaN or infinite row is an error that
// names it, never a KL of 0.
TEST(LogitComparisonTest, ComparesRowsAndRefusesNonFiniteOnes) {
  const std::vector<float> reference = {0, 1, 2, 2, 1, 0}, same = reference;
  const int32_t targets[] = {2, 0};
  const auto name = [](int64_t r) { return absl::StrCat("row ", r); };
  absl::StatusOr<std::vector<RowComparison>> compared =
      CompareLogitRows(reference.data(), same.data(), 2, 3, targets, name);
  ASSERT_TRUE(compared.ok()) << compared.status();
  for (const RowComparison& row : *compared) {
    EXPECT_EQ(row.kl, 0);
    EXPECT_TRUE(row.same_top1);
    EXPECT_DOUBLE_EQ(row.nll, row.reference_nll);
  }
  EXPECT_DOUBLE_EQ((*compared)[0].nll, NegativeLogLikelihood(LogitRow(reference.data(), 3), 2));
  std::vector<float> nan_row = reference, infinite_reference = reference;
  nan_row[4] = std::nanf("");
  infinite_reference[0] = INFINITY;
  const absl::Status nan = CompareLogitRows(reference.data(), nan_row.data(), 2, 3, nullptr, name).status();
  EXPECT_EQ(nan.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(nan.message(), "non-finite logits at row 1 under the plan");
  EXPECT_EQ(CompareLogitRows(infinite_reference.data(), same.data(), 2, 3, nullptr, name).status().message(),
            "non-finite logits at row 0 under the full cache");
}

}  // namespace
}  // namespace kvplan
