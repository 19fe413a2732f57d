#include "calibrate/dictionaries.h"

#include <vector>

#include "base/status_macros.h"
#include "calibrate/dictionary_learning.h"
#include "calibrate/plan_settings.h"

namespace kvplan {

absl::StatusOr<plan::SparseCoding> TrainDictionaries(const CalibrateOptions& options, const CalibrationSession& session,
                                                     const StatisticsObserver& statistics, const std::set<int>& sharers,
                                                     StageClock& clock) {
  const ModelConfig& config = session.config();
  auto learn = [&](const std::vector<float>& samples, int sparsity) -> absl::StatusOr<plan::Dictionary> {
    if (session.on_device())
      return LearnDictionaryOnDevice(samples, config.head_dim, options.dictionary_atoms, sparsity,
                                     options.dictionary_epochs);
    return LearnDictionary(samples, config.head_dim, options.dictionary_atoms, sparsity, options.dictionary_epochs);
  };
  plan::SparseCoding coding = CodingSettings(options);
  for (int layer = 0; layer < config.num_layers; ++layer) {
    clock.Progress("dictionaries", layer, config.num_layers);
    if (sharers.contains(layer)) continue;
    auto* entry = coding.add_layers();
    entry->set_layer(layer);
    KVPLAN_ASSIGN_OR_RETURN(*entry->mutable_keys(), learn(statistics.key_samples(layer), options.key_sparsity));
    KVPLAN_ASSIGN_OR_RETURN(*entry->mutable_values(), learn(statistics.value_samples(layer), options.value_sparsity));
  }
  clock.Progress("dictionaries", config.num_layers, config.num_layers);
  return coding;
}

}  // namespace kvplan
