#include "calibrate/plan_settings.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/build_info.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {

PlannerInputs BaseInputs(const CalibrateOptions& options, const ModelConfig& config, const WeightSource& weights) {
  PlannerInputs inputs;
  inputs.model = FingerprintModel(config, weights);
  inputs.target_memory_ratio = options.target_memory_ratio;
  inputs.reference_context = options.reference_context > 0
                                 ? options.reference_context
                                 : int(std::min<int64_t>(config.max_position_embeddings, 2048));
  inputs.budget_settings = options.budget_settings;
  std::erase_if(inputs.budget_settings.exempt_layers, [](int layer) { return layer < 0; });
  inputs.refresh_policy = options.refresh_policy;
  inputs.refresh = options.methods.contains(CalibrationMethod::kRefresh);
  inputs.calibration.set_tool_version(absl::StrCat("kvplan ", kKvplanVersion));
  return inputs;
}

plan::SparseCoding CodingSettings(const CalibrateOptions& options) {
  plan::SparseCoding coding;
  coding.set_key_sparsity(options.key_sparsity);
  coding.set_value_sparsity(options.value_sparsity);
  coding.set_recent_window(options.coding_recent_window);
  coding.set_keys_coded_after_rope(options.keys_after_rope);
  return coding;
}

plan::KvQuantization QuantizationSettings(const CalibrateOptions& options, int layers, int kv_dim) {
  plan::KvQuantization quantization;
  quantization.set_recent_window(options.quantization_recent_window);
  for (int layer = 0; layer < layers; ++layer) {
    auto* entry = quantization.add_layers();
    entry->set_layer(layer);
    entry->set_key_bits(options.key_bits);
    entry->set_value_bits(options.value_bits);
    entry->mutable_key_channel_scale()->Resize(kv_dim, 1.0f);
  }
  return quantization;
}

}  // namespace kvplan
