// Comparing a cache plan's next-token logits with the full cache's, row by row: the one comparison eval's
// --plan report and calibration's measured losses both take.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

struct RowComparison {
  double kl = 0;           // KL(full cache ‖ plan) of the next-token distributions
  bool same_top1 = false;  // both pick the same most likely token
  // With targets: −log p(target) under the plan and under the full cache.
  double nll = 0, reference_nll = 0;
};

// Compares `rows` rows of `vocab` logits (candidate: under the plan; reference: the full cache's), rows in
// parallel. targets ([rows], nullable) are the tokens that follow, for the NLLs. A row whose logits, in either, are
// not finite is an error naming it as row_name(r) does: KL is clamped at 0 (rounding leaves tiny negatives), so a
// NaN would otherwise count as no loss at all.
absl::StatusOr<std::vector<RowComparison>> CompareLogitRows(const float* reference, const float* candidate,
                                                            int64_t rows, int vocab, const int32_t* targets,
                                                            const std::function<std::string(int64_t)>& row_name);

}  // namespace kvplan
