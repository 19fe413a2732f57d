// The planner's inputs that follow from the options alone, before any statistics: what a calibrated plan and a
// synthetic one share.
#pragma once

#include "calibrate/calibrate.h"
#include "loader/model_config.h"
#include "loader/weights.h"
#include "planner/planner.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// The model's fingerprint, the target, the budget and RefreshKV settings, and the tool version the plan is
// stamped with.
PlannerInputs BaseInputs(const CalibrateOptions& options, const ModelConfig& config, const WeightSource& weights);

// CSR's settings, without dictionaries.
plan::SparseCoding CodingSettings(const CalibrateOptions& options);

// Every layer quantized at the options' widths, key channel scales 1 (calibration replaces them).
plan::KvQuantization QuantizationSettings(const CalibrateOptions& options, int layers, int kv_dim);

}  // namespace kvplan
