// The dictionary stage: a key and a value CSR dictionary for every layer that keeps its own cache, learned from
// the head vectors the statistics sampled (calibrate/dictionary_learning.h trains each).
#pragma once

#include <set>

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "calibrate/session.h"
#include "calibrate/statistics.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// The options' coding settings with the dictionaries of every layer but the `sharers`; trained on the GPU when
// the session runs there.
absl::StatusOr<plan::SparseCoding> TrainDictionaries(const CalibrateOptions& options, const CalibrationSession& session,
                                                     const StatisticsObserver& statistics, const std::set<int>& sharers,
                                                     StageClock& clock);

}  // namespace kvplan
