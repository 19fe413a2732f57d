// The plan's verification: the optimiser's chosen plan, whole, on text and probes its measurements did not see.
#pragma once

#include "absl/status/status.h"
#include "calibrate/plan_loss.h"
#include "calibrate/session.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// Runs `sequences` under `plan` on the session's runtime model against the full cache and records the losses in
// the plan's optimiser decisions (verified_*).
absl::Status VerifyPlan(CalibrationSession& session, PlanLossSequences sequences, StageClock& clock, plan::Plan& plan);

}  // namespace kvplan
