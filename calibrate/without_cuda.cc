// A build without CUDA: calibration's statistics and dictionary training run on the CPU only.
#include "absl/status/status.h"
#include "calibrate/device_statistics.h"
#include "calibrate/dictionary_learning.h"

namespace kvplan {

std::unique_ptr<DeviceStatistics> CreateDeviceStatistics(const ModelConfig&, int, float) { return nullptr; }

absl::StatusOr<plan::Dictionary> LearnDictionaryOnDevice(const std::vector<float>&, int, int, int, int) {
  return absl::FailedPreconditionError("kvplan was built without CUDA: dictionaries train on the CPU only");
}

}  // namespace kvplan
