// The statistics stage: full-cache forward passes over the calibration sequences, observed for what every method
// needs (per-layer key and value means, sampled head vectors, attention coverage, final hidden states).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "calibrate/device_statistics.h"
#include "calibrate/session.h"
#include "loader/model_config.h"
#include "runtime/model.h"

namespace kvplan {

// Collects, from full-cache forward passes, what every method needs; on the GPU runtime it reduces the tensors
// where they are.
class StatisticsObserver : public ForwardObserver {
 public:
  // Keeps the final hidden states of the first `hidden_rows` rows (the sharing search compares against them).
  StatisticsObserver(const ModelConfig& config, int max_vectors, int sequence_length, bool keys_after_rope,
                     int64_t hidden_rows);

  void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope, const float* v) override;
  // With CUDA, the same statistics reduced where the tensors are (calibrate/device_statistics.h).
  bool OnDeviceLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope, const float* v,
                       void* stream) override;
  void OnFinalHidden(int rows, const float* hidden) override;
  // A failure of the device reductions, reported after the pass.
  const absl::Status& device_status() const { return device_status_; }

  std::vector<float> LayerMean(int layer, int64_t tokens) const;
  // [layer][kv head]: the mean fraction of a whole sequence's positions that holds 90% of a query's attention;
  // 1 where nothing was measured.
  std::vector<std::vector<float>> Coverage() const;
  // Quantization's key channel scales ([kv_heads, head_dim]): the RMS of each channel's rotate-half pair over the
  // layer's sampled keys of that head (RoPE only rotates within pairs, so keys before and after it agree), floored
  // at 1% of the head's largest so that a silent channel's rounding noise is not blown up.
  std::vector<float> KeyChannelScales(int layer) const;
  const std::vector<float>& key_samples(int layer) const { return key_samples_[layer]; }
  const std::vector<float>& value_samples(int layer) const { return value_samples_[layer]; }
  const std::vector<float>& hidden() const { return hidden_; }

 private:
  // Which of a pass's head vectors (row * kv_heads + head) the reservoir keeps, and in which slots (a later pair
  // may take a slot an earlier one took).
  struct Samples {
    std::vector<int32_t> vectors;
    std::vector<int64_t> slots;
  };
  Samples DrawSamples(int layer, int rows);
  // keys, values: [samples, head_dim], the sampled vectors in order.
  void StoreSamples(int layer, const Samples& samples, const std::vector<float>& keys,
                    const std::vector<float>& values);
  // coverage: [queries, heads] from attention_coverage over a whole calibration sequence; each KV head gets its
  // query heads' mean.
  void AccumulateCoverage(int layer, int queries, const std::vector<float>& coverage);
  // How many last rows' queries measure coverage in a pass of `rows`: only whole calibration sequences do.
  int CoverageQueries(int rows) const;

  const ModelConfig& config_;
  int64_t hidden_rows_;
  bool keys_after_rope_;
  int sequence_length_;
  int64_t max_vectors_;
  std::vector<std::vector<double>> kv_sums_;
  std::vector<std::vector<float>> key_samples_, value_samples_;
  std::vector<std::vector<int32_t>> sample_heads_;  // [layer][sample slot]: the KV head the sample came from
  std::vector<int64_t> seen_;
  std::vector<std::vector<double>> coverage_sums_;
  std::vector<int64_t> coverage_counts_;
  std::vector<float> hidden_;
  std::mt19937_64 generator_;
  std::unique_ptr<DeviceStatistics> device_;  // null without CUDA
  absl::Status device_status_;
};

// Every calibration sequence through the session's full-cache runtime model, shown to `statistics`; sets the
// report's device.
absl::Status CollectStatistics(CalibrationSession& session, StatisticsObserver& statistics, StageClock& clock);

}  // namespace kvplan
