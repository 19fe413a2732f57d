// One rule for every numeric comparison against a reference: element i passes when
// |actual - expected| <= atol + rtol * |expected| (llm.c's validate_result, FlashInfer's isclose), and non-finite
// values must match in kind. No whole-tensor norm and no share of elements allowed to fail: one bad element
// fails the check, and the message names the first few.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace kvplan::testing {

struct Tolerance {
  double atol = 0;
  double rtol = 0;
};

inline ::testing::AssertionResult AllClose(const float* actual, const float* expected, size_t n, Tolerance tolerance) {
  constexpr int kShown = 5;
  size_t failures = 0;
  double worst_abs = 0, worst_rel = 0;
  std::string shown;
  for (size_t i = 0; i < n; ++i) {
    const double a = actual[i], e = expected[i];
    bool ok;
    if (!std::isfinite(e) || !std::isfinite(a)) {
      ok = (std::isnan(a) && std::isnan(e)) || a == e;
    } else {
      const double difference = std::fabs(a - e);
      ok = difference <= tolerance.atol + tolerance.rtol * std::fabs(e);
      worst_abs = std::max(worst_abs, difference);
      if (e != 0) worst_rel = std::max(worst_rel, difference / std::fabs(e));
    }
    if (ok) continue;
    if (failures++ < kShown) absl::StrAppendFormat(&shown, "\n  [%d] actual %.9g expected %.9g", i, a, e);
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << absl::StrFormat(
             "%d of %d elements outside atol %g + rtol %g * |expected| (worst abs %.3g, worst rel %.3g):%s", failures,
             n, tolerance.atol, tolerance.rtol, worst_abs, worst_rel, shown);
}

inline ::testing::AssertionResult AllClose(const std::vector<float>& actual, const std::vector<float>& expected,
                                           Tolerance tolerance) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "sizes differ: " << actual.size() << " vs " << expected.size();
  return AllClose(actual.data(), expected.data(), expected.size(), tolerance);
}

}  // namespace kvplan::testing
