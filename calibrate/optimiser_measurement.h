// The quality optimiser's measurement stage: every layer's loss under every quantization width x budget fraction,
// on calibration text and retrieval probes, for the planner to choose from.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "calibrate/plan_loss.h"
#include "calibrate/session.h"
#include "planner/planner.h"

namespace kvplan {

// The first options.optimiser_sequences calibration sequences (and retrieval probes in them) measure every layer
// (sharers aside) under each setting, alone and all layers at once; the losses are the KL added to the base
// plan's (inputs' shares). Sets inputs' measured_settings and retrieval_weight; returns the last
// options.verify_sequences sequences and their probes, for the plan's verification. InvalidArgument when the
// sequences are too few for both.
absl::StatusOr<PlanLossSequences> MeasureSettings(const CalibrateOptions& options, CalibrationSession& session,
                                                  PlannerInputs& inputs, StageClock& clock);

}  // namespace kvplan
