// The sharing search (KVSharer): layer pairs tried most dissimilar first, each share kept while the model's last
// hidden state stays close to the full cache's.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "calibrate/session.h"
#include "calibrate/statistics.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// Every candidate runs on the session's runtime model over `sequences` (those whose final hidden states
// `statistics` kept); `tokens`: how many the statistics' layer means were summed over. Counts the candidates and
// their time in the clock's report.
absl::StatusOr<plan::LayerSharing> SearchSharing(const CalibrateOptions& options, CalibrationSession& session,
                                                 const plan::ModelFingerprint& fingerprint,
                                                 const std::vector<std::vector<int32_t>>& sequences,
                                                 const StatisticsObserver& statistics, int64_t tokens,
                                                 StageClock& clock);

}  // namespace kvplan
