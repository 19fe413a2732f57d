#include "runtime/sampling.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace kvplan {
namespace {

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 1.0f, 2.0f, 0.0f};  // the first maximum is token 1

int32_t SampleOnce(const SamplingSettings& settings, const std::vector<float>& logits) {
  absl::StatusOr<Sampler> sampler = Sampler::Create(settings);
  EXPECT_TRUE(sampler.ok()) << sampler.status();
  absl::StatusOr<int32_t> token = sampler->Sample(logits);
  EXPECT_TRUE(token.ok()) << token.status();
  return *token;
}

TEST(SamplingTest, TemperatureZeroIsTheFirstArgmax) {
  for (uint64_t seed : {0, 1, 99}) EXPECT_EQ(SampleOnce({.temperature = 0, .seed = seed}, kLogits), 1);
}

TEST(SamplingTest, TopKOneIsTheFirstArgmax) {
  for (uint64_t seed : {0, 1, 99}) EXPECT_EQ(SampleOnce({.temperature = 5, .top_k = 1, .seed = seed}, kLogits), 1);
}

TEST(SamplingTest, ASeedRepeatsItsDraws) {
  auto draws = [](uint64_t seed) {
    Sampler sampler = *Sampler::Create({.temperature = 1.5f, .top_k = 5, .top_p = 0.95f, .seed = seed});
    std::vector<int32_t> tokens;
    for (int i = 0; i < 64; ++i) tokens.push_back(*sampler.Sample(kLogits));
    return tokens;
  };
  EXPECT_EQ(draws(7), draws(7));
  EXPECT_NE(draws(7), draws(8));
}

TEST(SamplingTest, DrawsFollowTheSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f};
  const float temperature = 0.8f;
  std::vector<double> expected(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) total += expected[i] = std::exp(logits[i] / temperature);
  Sampler sampler = *Sampler::Create({.temperature = temperature, .seed = 3});
  const int draws = 20000;
  std::vector<int> counts(logits.size());
  for (int i = 0; i < draws; ++i) ++counts[*sampler.Sample(logits)];
  for (size_t i = 0; i < logits.size(); ++i) {
    const double p = expected[i] / total;
    // Five standard errors of a binomial proportion.
    EXPECT_NEAR(double(counts[i]) / draws, p, 5 * std::sqrt(p * (1 - p) / draws)) << "token " << i;
  }
}

TEST(SamplingTest, TopKAndTopPDrawOnlyFromTheKeptTokens) {
  const std::vector<float> logits = {3.0f, 2.9f, 0.0f, -5.0f};
  Sampler top_k = *Sampler::Create({.temperature = 1, .top_k = 2, .seed = 1});
  // Softmax: 0.51, 0.46, 0.03, ...: top_p 0.9 keeps the first two.
  Sampler top_p = *Sampler::Create({.temperature = 1, .top_p = 0.9f, .seed = 1});
  std::vector<int> k_counts(logits.size()), p_counts(logits.size());
  for (int i = 0; i < 2000; ++i) {
    ++k_counts[*top_k.Sample(logits)];
    ++p_counts[*top_p.Sample(logits)];
  }
  for (const std::vector<int>& counts : {k_counts, p_counts}) {
    EXPECT_GT(counts[0], 0);
    EXPECT_GT(counts[1], 0);
    EXPECT_EQ(counts[2] + counts[3], 0);
  }
}

TEST(SamplingTest, BadSettingsAreInvalidArguments) {
  for (const SamplingSettings& settings : std::vector<SamplingSettings>{{.temperature = -0.1f},
                                                                        {.temperature = NAN},
                                                                        {.top_k = -1},
                                                                        {.top_p = 0},
                                                                        {.top_p = -0.5f},
                                                                        {.top_p = 1.01f}}) {
    absl::StatusOr<Sampler> sampler = Sampler::Create(settings);
    EXPECT_EQ(sampler.status().code(), absl::StatusCode::kInvalidArgument) << sampler.status();
  }
  Sampler sampler = *Sampler::Create({});
  EXPECT_EQ(sampler.Sample({}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvplan
