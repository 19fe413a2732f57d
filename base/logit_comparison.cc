#include "base/logit_comparison.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/token_statistics.h"

namespace kvplan {

absl::StatusOr<std::vector<RowComparison>> CompareLogitRows(const float* reference, const float* candidate,
                                                            int64_t rows, int vocab, const int32_t* targets,
                                                            const std::function<std::string(int64_t)>& row_name) {
  std::vector<RowComparison> compared(rows);
  std::vector<uint8_t> finite(rows, 1);
  // A row's log-partitions cost a pass over the vocabulary each, as much as a small model's forward on a GPU.
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const LogitRow reference_row(reference + r * vocab, vocab), row(candidate + r * vocab, vocab);
    if (!std::isfinite(reference_row.log_partition) || !std::isfinite(row.log_partition)) {
      finite[r] = 0;
      continue;
    }
    RowComparison& result = compared[r];
    result.kl = KlDivergence(reference_row, row);
    result.same_top1 = Argmax(row.logits, vocab) == Argmax(reference_row.logits, vocab);
    if (targets == nullptr) continue;
    result.nll = NegativeLogLikelihood(row, targets[r]);
    result.reference_nll = NegativeLogLikelihood(reference_row, targets[r]);
  }
  for (int64_t r = 0; r < rows; ++r)
    if (!finite[r])
      return absl::InternalError(absl::StrCat("non-finite logits at ", row_name(r),
                                              std::isfinite(LogitRow(reference + r * vocab, vocab).log_partition)
                                                  ? " under the plan"
                                                  : " under the full cache"));
  return compared;
}

}  // namespace kvplan
