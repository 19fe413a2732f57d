#include "calibrate/optimiser_measurement.h"

#include <algorithm>
#include <memory>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

constexpr char kStage[] = "optimiser: measuring settings";

// Every combination of the options' widths (and bf16) with their keep fractions (and 1) but the full cache.
std::vector<LayerSetting> SettingsToMeasure(const CalibrateOptions& options) {
  std::vector<LayerSetting> settings;
  std::vector<int> widths = {16};
  widths.insert(widths.end(), options.optimiser_widths.begin(), options.optimiser_widths.end());
  std::vector<float> fractions = {1.0f};
  fractions.insert(fractions.end(), options.optimiser_keep_fractions.begin(), options.optimiser_keep_fractions.end());
  for (int bits : widths)
    for (float fraction : fractions)
      if (bits < 16 || fraction < 1.0f) settings.push_back({bits, fraction});
  return settings;
}

// `layer` of `policies` under `setting` (its cache policy, and its key channel scales when quantized).
void ApplyLayerSetting(const PlannerInputs& inputs, int layer, const LayerSetting& setting, PlanPolicies& policies) {
  policies.cache.layers[layer] =
      LayerPolicyForSetting(setting, inputs.budget_settings.policy, inputs.quantization.recent_window(),
                            inputs.model.head_dim(), inputs.model.num_kv_heads());
  if (setting.bits < 16) {
    const auto& scales = inputs.quantization.layers(layer).key_channel_scale();
    policies.codebooks[layer] =
        std::make_shared<const LayerCodebook>(LayerCodebook{.key_channel_scale = {scales.begin(), scales.end()}});
  }
}

// Measures plans against the base plan (the accepted shares): a setting's loss is what it adds to the base's.
class SettingMeter {
 public:
  SettingMeter(Model& model, PlanLossSequences sequences, PlanPolicies base)
      : meter_(model, std::move(sequences)), base_(std::move(base)) {}

  absl::Status RunReference() {
    KVPLAN_RETURN_IF_ERROR(meter_.RunReference());
    KVPLAN_ASSIGN_OR_RETURN(base_loss_, meter_.Measure(std::make_shared<const PlanPolicies>(base_)));
    return absl::OkStatus();
  }
  // The base plan with `setting` on each of `layers`.
  absl::StatusOr<MeasuredSetting> Measure(const PlannerInputs& inputs, const std::vector<int>& layers,
                                          const LayerSetting& setting) {
    auto policies = std::make_shared<PlanPolicies>(base_);
    for (int layer : layers) ApplyLayerSetting(inputs, layer, setting, *policies);
    KVPLAN_ASSIGN_OR_RETURN(const PlanLoss loss, meter_.Measure(std::move(policies)));
    return MeasuredSetting{.setting = setting,
                           .kl = std::max(0.0, loss.text.kl - base_loss_.text.kl),
                           .probe_kl = std::max(0.0, loss.probes.kl - base_loss_.probes.kl)};
  }

 private:
  PlanLossMeter meter_;
  PlanPolicies base_;
  PlanLoss base_loss_;
};

// Rescales the layers' losses of one setting to add up to `joint`'s, keeping their proportions.
void RescaleToJoint(std::vector<std::vector<MeasuredSetting>>& measured, const std::vector<int>& layers, size_t i,
                    const MeasuredSetting& joint) {
  for (double MeasuredSetting::*field : {&MeasuredSetting::kl, &MeasuredSetting::probe_kl}) {
    double sum = 0;
    for (int layer : layers) sum += measured[layer][i].*field;
    for (int layer : layers)
      measured[layer][i].*field =
          sum > 0 ? measured[layer][i].*field * (joint.*field / sum) : joint.*field / double(layers.size());
  }
}

absl::StatusOr<std::vector<std::vector<MeasuredSetting>>> MeasureEveryLayer(const CalibrateOptions& options,
                                                                            CalibrationSession& session,
                                                                            const PlannerInputs& inputs,
                                                                            PlanLossSequences sequences,
                                                                            StageClock& clock) {
  const ModelConfig& config = session.config();
  const std::vector<LayerSetting> settings = SettingsToMeasure(options);
  plan::Plan base_plan;
  *base_plan.mutable_model() = inputs.model;
  *base_plan.mutable_sharing() = inputs.sharing;
  KVPLAN_ASSIGN_OR_RETURN(PlanPolicies base, PoliciesFromPlan(base_plan, config, session.weights()));
  std::vector<int> compressible;  // the layers that are not sharers
  std::set<int> sharers;
  for (const auto& share : inputs.sharing.shares()) sharers.insert(share.layer());
  for (int layer = 0; layer < config.num_layers; ++layer)
    if (!sharers.contains(layer)) compressible.push_back(layer);

  const int64_t total = int64_t(config.num_layers + 1) * int64_t(settings.size());
  clock.Progress(kStage, 0, total);
  KVPLAN_ASSIGN_OR_RETURN(Model * model, session.Runtime());
  SettingMeter meter(*model, std::move(sequences), std::move(base));
  KVPLAN_RETURN_IF_ERROR(meter.RunReference());
  std::vector<std::vector<MeasuredSetting>> measured(config.num_layers);
  int64_t done = 0;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    for (const LayerSetting& setting : settings) {
      clock.Progress(kStage, done++, total);
      if (sharers.contains(layer)) continue;
      KVPLAN_ASSIGN_OR_RETURN(measured[layer].emplace_back(), meter.Measure(inputs, {layer}, setting));
    }
  }
  // One layer compressed while the rest stay exact hides most of its damage in a deep model (llama-dev-16l: the
  // layers' losses summed to 1/40 of what their plan verified at). Each setting is also measured on every layer
  // at once, and the layers' losses are rescaled to add up to that, keeping their proportions: the layers rank as
  // measured alone, at the magnitude they cost together.
  for (size_t i = 0; i < settings.size(); ++i) {
    clock.Progress(kStage, done++, total);
    KVPLAN_ASSIGN_OR_RETURN(const MeasuredSetting joint, meter.Measure(inputs, compressible, settings[i]));
    RescaleToJoint(measured, compressible, i, joint);
  }
  clock.Progress(kStage, total, total);
  return measured;
}

}  // namespace

absl::StatusOr<PlanLossSequences> MeasureSettings(const CalibrateOptions& options, CalibrationSession& session,
                                                  PlannerInputs& inputs, StageClock& clock) {
  const std::vector<std::vector<int32_t>>& sequences = session.sequences();
  const int64_t measured = options.optimiser_sequences, verified = options.verify_sequences;
  if (measured < 1 || verified < 1 || int64_t(sequences.size()) < measured + verified)
    return absl::InvalidArgumentError(absl::StrCat("the optimiser measures on ", measured, " and verifies on ",
                                                   verified, " other calibration sequences; the data holds ",
                                                   sequences.size()));
  const std::vector<std::vector<int32_t>> measure_sequences(sequences.begin(), sequences.begin() + measured);
  const std::vector<std::vector<int32_t>> held_back(sequences.end() - verified, sequences.end());
  PlanLossSequences measurement = {.text = WhollyScored(measure_sequences)};
  PlanLossSequences verification = {.text = WhollyScored(held_back)};
  if (options.retrieval_probes > 0 && !session.random_tokens()) {
    const Tokenizer& tokenizer = *session.model().tokenizer;
    KVPLAN_ASSIGN_OR_RETURN(measurement.probes,
                            RetrievalProbes(tokenizer, measure_sequences, options.retrieval_probes));
    KVPLAN_ASSIGN_OR_RETURN(verification.probes, RetrievalProbes(tokenizer, held_back, options.retrieval_probes));
  }
  inputs.retrieval_weight = options.retrieval_weight;
  KVPLAN_ASSIGN_OR_RETURN(inputs.measured_settings,
                          MeasureEveryLayer(options, session, inputs, std::move(measurement), clock));
  return verification;
}

}  // namespace kvplan
