#include "calibrate/synthetic_plan.h"

#include <random>
#include <vector>

#include "absl/status/status.h"
#include "base/status_macros.h"
#include "calibrate/dictionary_learning.h"
#include "calibrate/plan_settings.h"
#include "loader/open_model.h"

namespace kvplan {

absl::StatusOr<plan::Plan> SyntheticPlan(const CalibrateOptions& options) {
  if (options.methods.contains(CalibrationMethod::kShare))
    return absl::InvalidArgumentError(
        "layer sharing is searched on the model's outputs; a random-weight --shape has "
        "none worth keeping (drop share from --methods)");
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, RandomModel(options.model_shape, 1));
  const ModelConfig& config = loaded.config;
  PlannerInputs inputs = BaseInputs(options, config, *loaded.weights);
  inputs.calibration.set_data_path("synthetic: random weights, random unit atoms, uniform attention coverage");
  if (options.methods.contains(CalibrationMethod::kDict)) {
    inputs.sparse_coding = CodingSettings(options);
    std::mt19937 generator(11);
    std::normal_distribution<float> normal;
    const int hd = config.head_dim, atoms = options.dictionary_atoms;
    for (int layer = 0; layer < config.num_layers; ++layer) {
      auto* entry = inputs.sparse_coding.add_layers();
      entry->set_layer(layer);
      for (plan::Dictionary* dictionary : {entry->mutable_keys(), entry->mutable_values()}) {
        dictionary->set_atoms(atoms);
        dictionary->set_dim(hd);
        std::vector<float> values(int64_t(atoms) * hd);
        for (float& value : values) value = normal(generator);
        NormaliseAtoms(values, hd);
        dictionary->mutable_values()->Assign(values.begin(), values.end());
      }
    }
  }
  if (options.methods.contains(CalibrationMethod::kQuant))
    inputs.quantization = QuantizationSettings(options, config.num_layers, config.kv_dim());
  if (options.methods.contains(CalibrationMethod::kBudget))
    inputs.attention_coverage =
        std::vector<std::vector<float>>(config.num_layers, std::vector<float>(config.num_kv_heads, 0.1f));
  return CompilePlan(inputs);
}

}  // namespace kvplan
