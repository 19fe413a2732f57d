#include "calibrate/statistics.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "base/status_macros.h"
#include "kernels/cpu/calibration_statistics.h"

namespace kvplan {
namespace {

constexpr float kCoverageMass = 0.9f;  // attention mass a head's budget should cover
constexpr int kCoverageQueries = 32;   // last rows of each calibration sequence used as queries

}  // namespace

StatisticsObserver::StatisticsObserver(const ModelConfig& config, int max_vectors, int sequence_length,
                                       bool keys_after_rope, int64_t hidden_rows)
    : config_(config),
      hidden_rows_(hidden_rows),
      keys_after_rope_(keys_after_rope),
      sequence_length_(sequence_length),
      max_vectors_(max_vectors),
      kv_sums_(config.num_layers, std::vector<double>(2 * config.kv_dim(), 0.0)),
      key_samples_(config.num_layers),
      value_samples_(config.num_layers),
      sample_heads_(config.num_layers),
      seen_(config.num_layers, 0),
      coverage_sums_(config.num_layers, std::vector<double>(config.num_kv_heads, 0.0)),
      coverage_counts_(config.num_layers, 0),
      generator_(17),
      device_(CreateDeviceStatistics(config, kCoverageQueries, kCoverageMass)) {}

void StatisticsObserver::OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                                   const float* v) {
  cpu::add_column_sums(k_pre_rope, rows, config_.kv_dim(), kv_sums_[layer].data());
  cpu::add_column_sums(v, rows, config_.kv_dim(), kv_sums_[layer].data() + config_.kv_dim());
  const Samples samples = DrawSamples(layer, rows);
  std::vector<float> keys(samples.vectors.size() * config_.head_dim), values(keys.size());
  cpu::gather_rows(keys_after_rope_ ? k : k_pre_rope, samples.vectors.data(), int(samples.vectors.size()),
                   config_.head_dim, keys.data());
  cpu::gather_rows(v, samples.vectors.data(), int(samples.vectors.size()), config_.head_dim, values.data());
  StoreSamples(layer, samples, keys, values);
  const int queries = CoverageQueries(rows);
  if (queries == 0) return;
  std::vector<float> coverage(size_t(queries) * config_.num_heads);
  cpu::attention_coverage(q, k, rows, config_.num_heads, config_.num_kv_heads, config_.head_dim, rows - queries,
                          kCoverageMass, coverage.data());
  AccumulateCoverage(layer, queries, coverage);
}

bool StatisticsObserver::OnDeviceLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                                         const float* v, void* stream) {
  if (device_ == nullptr) return false;
  if (!device_status_.ok()) return true;
  const Samples samples = DrawSamples(layer, rows);
  const int queries = CoverageQueries(rows);
  absl::StatusOr<ReducedLayer> reduced =
      device_->Reduce({.rows = rows, .q = q, .k = k, .k_pre_rope = k_pre_rope, .v = v, .stream = stream},
                      samples.vectors, keys_after_rope_, queries);
  if (!reduced.ok()) {
    device_status_ = reduced.status();
    return true;
  }
  for (int i = 0; i < 2 * config_.kv_dim(); ++i) kv_sums_[layer][i] += reduced->sums[i];
  StoreSamples(layer, samples, reduced->keys, reduced->values);
  if (queries > 0) AccumulateCoverage(layer, queries, reduced->coverage);
  return true;
}

void StatisticsObserver::OnFinalHidden(int rows, const float* hidden) {
  const int64_t kept = int64_t(hidden_.size()) / config_.hidden_size;
  const int64_t taken = std::clamp<int64_t>(hidden_rows_ - kept, 0, rows);
  hidden_.insert(hidden_.end(), hidden, hidden + taken * config_.hidden_size);
}

std::vector<float> StatisticsObserver::LayerMean(int layer, int64_t tokens) const {
  std::vector<float> mean(kv_sums_[layer].size());
  for (size_t i = 0; i < mean.size(); ++i) mean[i] = float(kv_sums_[layer][i] / std::max<int64_t>(1, tokens));
  return mean;
}

std::vector<std::vector<float>> StatisticsObserver::Coverage() const {
  std::vector<std::vector<float>> coverage(config_.num_layers, std::vector<float>(config_.num_kv_heads, 1.0f));
  for (int l = 0; l < config_.num_layers; ++l)
    for (int h = 0; h < config_.num_kv_heads; ++h)
      if (coverage_counts_[l] > 0) coverage[l][h] = float(coverage_sums_[l][h] / coverage_counts_[l]);
  return coverage;
}

std::vector<float> StatisticsObserver::KeyChannelScales(int layer) const {
  const int hd = config_.head_dim, half = hd / 2, kv_heads = config_.num_kv_heads;
  std::vector<double> squares(int64_t(kv_heads) * hd, 0.0);
  std::vector<int64_t> counts(kv_heads, 0);
  const std::vector<float>& keys = key_samples_[layer];
  for (size_t n = 0; n < sample_heads_[layer].size(); ++n) {
    const int head = sample_heads_[layer][n];
    ++counts[head];
    for (int d = 0; d < hd; ++d) squares[int64_t(head) * hd + d] += double(keys[n * hd + d]) * keys[n * hd + d];
  }
  std::vector<float> scales(squares.size(), 1.0f);
  for (int h = 0; h < kv_heads; ++h) {
    if (counts[h] == 0) continue;
    float largest = 0.0f;
    for (int d = 0; d < hd; ++d) {
      const int partner = d < half ? d + half : d - half;
      const double pair = squares[int64_t(h) * hd + d] + squares[int64_t(h) * hd + partner];
      scales[int64_t(h) * hd + d] = float(std::sqrt(pair / (2.0 * counts[h])));
      largest = std::max(largest, scales[int64_t(h) * hd + d]);
    }
    for (int d = 0; d < hd; ++d)
      scales[int64_t(h) * hd + d] = std::max(scales[int64_t(h) * hd + d], std::max(0.01f * largest, 1e-6f));
  }
  return scales;
}

StatisticsObserver::Samples StatisticsObserver::DrawSamples(int layer, int rows) {
  Samples samples;
  for (int64_t i = 0; i < int64_t(rows) * config_.num_kv_heads; ++i) {
    const int64_t index = seen_[layer]++;
    int64_t slot = index;
    if (index >= max_vectors_) {
      slot = std::uniform_int_distribution<int64_t>(0, index)(generator_);
      if (slot >= max_vectors_) continue;
    }
    samples.vectors.push_back(int32_t(i));
    samples.slots.push_back(slot);
  }
  return samples;
}

void StatisticsObserver::StoreSamples(int layer, const Samples& samples, const std::vector<float>& keys,
                                      const std::vector<float>& values) {
  const int hd = config_.head_dim;
  std::vector<int32_t>& heads = sample_heads_[layer];
  for (size_t n = 0; n < samples.slots.size(); ++n) {
    const int64_t slot = samples.slots[n];
    if (int64_t(heads.size()) <= slot) heads.resize(slot + 1);
    heads[slot] = samples.vectors[n] % config_.num_kv_heads;
    for (auto [stored, source] : {std::pair{&key_samples_[layer], &keys}, {&value_samples_[layer], &values}}) {
      if (int64_t(stored->size()) < (slot + 1) * hd) stored->resize((slot + 1) * hd);
      std::copy_n(source->begin() + n * hd, hd, stored->begin() + slot * hd);
    }
  }
}

void StatisticsObserver::AccumulateCoverage(int layer, int queries, const std::vector<float>& coverage) {
  const int heads = config_.num_heads, group = heads / config_.num_kv_heads;
  for (int i = 0; i < queries; ++i) {
    for (int h = 0; h < heads; ++h) coverage_sums_[layer][h / group] += double(coverage[size_t(i) * heads + h]) / group;
    ++coverage_counts_[layer];
  }
}

int StatisticsObserver::CoverageQueries(int rows) const {
  return rows == sequence_length_ ? std::min(kCoverageQueries, rows) : 0;
}

absl::Status CollectStatistics(CalibrationSession& session, StatisticsObserver& statistics, StageClock& clock) {
  const std::vector<std::vector<int32_t>>& sequences = session.sequences();
  clock.Progress("statistics", 0, int64_t(sequences.size()));
  KVPLAN_ASSIGN_OR_RETURN(Model * model, session.Runtime());
  clock.report().device = model->device_name();
  session.Observe(&statistics);
  for (size_t i = 0; i < sequences.size(); ++i) {
    model->Reset();
    KVPLAN_RETURN_IF_ERROR(model->Forward(SequenceRows(sequences[i], 0, 0), LogitRows::kLastPerSequence).status());
    clock.Progress("statistics", int64_t(i) + 1, int64_t(sequences.size()));
    KVPLAN_RETURN_IF_ERROR(statistics.device_status());
  }
  session.Observe(nullptr);
  return absl::OkStatus();
}

}  // namespace kvplan
