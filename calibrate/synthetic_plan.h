// A synthetic plan for a random-weight shape (CalibrateOptions::model_shape without random_tokens): such a model
// has nothing to learn from, so the plan exercises the runtime at real scale, not quality.
#pragma once

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// Random unit atoms for CSR, the same attention coverage for every head, no layer sharing (InvalidArgument when
// the methods ask for it).
absl::StatusOr<plan::Plan> SyntheticPlan(const CalibrateOptions& options);

}  // namespace kvplan
