#include "calibrate/calibrate.h"

#include <algorithm>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "calibrate/dictionaries.h"
#include "calibrate/optimiser_measurement.h"
#include "calibrate/plan_loss.h"
#include "calibrate/plan_settings.h"
#include "calibrate/plan_verification.h"
#include "calibrate/session.h"
#include "calibrate/sharing_search.h"
#include "calibrate/statistics.h"
#include "calibrate/synthetic_plan.h"
#include "runtime/backend.h"

namespace kvplan {
namespace {

using enum CalibrationMethod;

absl::Status CheckOptions(const CalibrateOptions& options) {
  const CalibrationMethods& methods = options.methods;
  if (!(options.target_memory_ratio > 0.0f && options.target_memory_ratio <= 1.0f))
    return absl::InvalidArgumentError("--target-memory must be in (0, 1]: the plan's bytes over the full cache's");
  if (options.model_dir.empty() == options.model_shape.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --shape");
  if (options.random_tokens && options.model_shape.empty())
    return absl::InvalidArgumentError("--random-tokens calibrates a --shape; a checkpoint calibrates on --data");
  if (options.dictionary_atoms > 65536) return absl::InvalidArgumentError("at most 65536 atoms (16-bit indices)");
  if (methods.contains(kDict) && methods.contains(kQuant))
    return absl::InvalidArgumentError("dict and quant both code every layer: choose one");
  if (methods.contains(kOptimise))
    for (CalibrationMethod method : {kDict, kQuant, kBudget})
      if (methods.contains(method))
        return absl::InvalidArgumentError(absl::StrCat("optimise chooses quantization and budgets itself; drop ",
                                                       CalibrationMethodName(method), " from the methods"));
  for (int bits : options.optimiser_widths)
    if (!IsQuantizationWidth(bits))
      return absl::InvalidArgumentError(absl::StrCat("optimiser width ", bits, " is not 2, 4 or 8 bits"));
  for (float fraction : options.optimiser_keep_fractions)
    if (!(fraction > 0.0f && fraction <= 1.0f))
      return absl::InvalidArgumentError(absl::StrCat("optimiser keep fraction ", fraction, " is not in (0, 1]"));
  if (!IsQuantizationWidth(options.key_bits) || !IsQuantizationWidth(options.value_bits))
    return absl::InvalidArgumentError(
        absl::StrCat("quantization widths are 2, 4 or 8 bits, not ", options.key_bits, " and ", options.value_bits));
  return absl::OkStatus();
}

// The stages, in order, over `session`: statistics, then what each method needs of them, then the plan.
absl::StatusOr<plan::Plan> RunStages(const CalibrateOptions& options, CalibrationSession& session, StageClock& clock) {
  const CalibrationMethods& methods = options.methods;
  const ModelConfig& config = session.config();
  const std::vector<std::vector<int32_t>>& sequences = session.sequences();
  const std::vector<std::vector<int32_t>> share_sequences(
      sequences.begin(), sequences.begin() + std::clamp<int64_t>(options.share_sequences, 1, sequences.size()));

  StatisticsObserver statistics(
      config, options.max_training_vectors, options.sequence_length, options.keys_after_rope,
      methods.contains(kShare) ? int64_t(share_sequences.size()) * options.sequence_length : 0);
  KVPLAN_RETURN_IF_ERROR(CollectStatistics(session, statistics, clock));

  PlannerInputs inputs = BaseInputs(options, config, session.weights());
  inputs.calibration.set_data_path(session.random_tokens() ? "random token ids" : options.data_path);
  inputs.calibration.set_tokens(session.tokens());
  inputs.calibration.set_sequences(int(sequences.size()));
  inputs.calibration.set_sequence_length(options.sequence_length);

  if (methods.contains(kShare)) {
    KVPLAN_ASSIGN_OR_RETURN(inputs.sharing, SearchSharing(options, session, inputs.model, share_sequences, statistics,
                                                          session.tokens(), clock));
  }
  if (methods.contains(kQuant) || methods.contains(kOptimise)) {
    inputs.quantization = QuantizationSettings(options, config.num_layers, config.kv_dim());
    for (int layer = 0; layer < config.num_layers; ++layer) {
      const std::vector<float> scales = statistics.KeyChannelScales(layer);
      inputs.quantization.mutable_layers(layer)->mutable_key_channel_scale()->Assign(scales.begin(), scales.end());
    }
  }
  PlanLossSequences verification;
  if (methods.contains(kOptimise)) {
    KVPLAN_ASSIGN_OR_RETURN(verification, MeasureSettings(options, session, inputs, clock));
  }
  // Its device memory goes back before dictionary training; the optimiser (never with dictionaries) verifies on it.
  if (verification.text.empty()) session.ReleaseRuntime();

  if (methods.contains(kDict)) {
    std::set<int> sharers;
    for (const auto& share : inputs.sharing.shares()) sharers.insert(share.layer());
    KVPLAN_ASSIGN_OR_RETURN(inputs.sparse_coding, TrainDictionaries(options, session, statistics, sharers, clock));
  }
  if (methods.contains(kBudget)) inputs.attention_coverage = statistics.Coverage();
  clock.Progress("compiling the plan", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(plan::Plan plan, CompilePlan(inputs));
  clock.Progress("compiling the plan", 1, 1);
  if (!verification.text.empty()) KVPLAN_RETURN_IF_ERROR(VerifyPlan(session, std::move(verification), clock, plan));
  clock.Finish();
  return plan;
}

// The caller's report, emptied, or `scratch` when the caller wants none.
CalibrationReport& EmptyReport(CalibrationReport* report, CalibrationReport& scratch) {
  CalibrationReport& chosen = report != nullptr ? *report : scratch;
  chosen = CalibrationReport();
  return chosen;
}

// The stages, leaving the session without a runtime model whatever they return, so that the next calibration
// over it builds its own.
absl::StatusOr<plan::Plan> CalibrateOver(const CalibrateOptions& options, CalibrationSession& session,
                                         StageClock& clock) {
  absl::StatusOr<plan::Plan> plan = RunStages(options, session, clock);
  session.ReleaseRuntime();
  return plan;
}

}  // namespace

absl::StatusOr<plan::Plan> Calibrate(const CalibrateOptions& options, const CalibrationProgress& progress,
                                     CalibrationReport* report) {
  KVPLAN_RETURN_IF_ERROR(CheckOptions(options));
  if (!options.model_shape.empty() && !options.random_tokens) return SyntheticPlan(options);
  if (options.model_shape.empty() && options.data_path.empty())
    return absl::InvalidArgumentError("calibrating a checkpoint needs --data");
  CalibrationReport scratch;
  StageClock clock(progress, EmptyReport(report, scratch), ResolveBackend(options.device) == Backend::kCuda);
  KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<CalibrationSession> session, CalibrationSession::Open(options, clock));
  return CalibrateOver(options, *session, clock);
}

absl::StatusOr<plan::Plan> Calibrate(const CalibrateOptions& options, CalibrationSession& session,
                                     const CalibrationProgress& progress, CalibrationReport* report) {
  KVPLAN_RETURN_IF_ERROR(CheckOptions(options));
  if (!session.Serves(options))
    return absl::InvalidArgumentError(
        "these calibration options read another model, data or device than the session was opened with");
  CalibrationReport scratch;
  StageClock clock(progress, EmptyReport(report, scratch), session.on_device());
  return CalibrateOver(options, session, clock);
}

}  // namespace kvplan
