#include "calibrate/calibrate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "base/token_statistics.h"
#include "calibrate/dictionary_learning.h"
#include "kernels/cpu/calibration_statistics.h"
#include "loader/documents.h"
#include "loader/tokenizer.h"
#include "loader/open_model.h"
#include "runtime/backend.h"
#ifdef KVPLAN_WITH_CUDA
#include "kernels/cuda/calibration_statistics.h"
#include "runtime/cuda/device_memory.h"
#endif
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

constexpr float kCoverageMass = 0.9f;  // attention mass a head's budget should cover
constexpr int kCoverageQueries = 32;   // last rows of each calibration sequence used as queries

// Collects, from full-cache forward passes, what every method needs.
class StatisticsObserver : public ForwardObserver {
 public:
  // Keeps the final hidden states of the first `hidden_rows` rows (the sharing search compares against them).
  StatisticsObserver(const ModelConfig& config, int max_vectors, int sequence_length, bool keys_after_rope,
                     int64_t hidden_rows)
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
        generator_(17) {}

  void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                 const float* v) override {
    cpu::add_column_sums(k_pre_rope, rows, config_.kv_dim(), kv_sums_[layer].data());
    cpu::add_column_sums(v, rows, config_.kv_dim(), kv_sums_[layer].data() + config_.kv_dim());
    const Samples samples = DrawSamples(layer, rows);
    std::vector<float> keys(samples.vectors.size() * config_.head_dim), values(keys.size());
    cpu::gather_rows(keys_after_rope_ ? k : k_pre_rope, samples.vectors.data(), int(samples.vectors.size()),
                     config_.head_dim, keys.data());
    cpu::gather_rows(v, samples.vectors.data(), int(samples.vectors.size()), config_.head_dim, values.data());
    StoreSamples(layer, samples, keys, values);
    if (rows != sequence_length_) return;
    const int queries = std::min(kCoverageQueries, rows);
    std::vector<float> coverage(size_t(queries) * config_.num_heads);
    cpu::attention_coverage(q, k, rows, config_.num_heads, config_.num_kv_heads, config_.head_dim, rows - queries,
                            kCoverageMass, coverage.data());
    AccumulateCoverage(layer, queries, coverage);
  }

#ifdef KVPLAN_WITH_CUDA
  // The same statistics reduced where the tensors are: only sums, samples and coverage fractions come back.
  bool OnDeviceLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope, const float* v,
                       void* stream) override {
    if (!device_status_.ok()) return true;
    device_status_ = ReduceOnDevice(layer, rows, q, k, k_pre_rope, v, static_cast<cudaStream_t>(stream));
    return true;
  }
  // A failure of the device reductions, reported after the pass.
  const absl::Status& device_status() const { return device_status_; }
#endif

  void OnFinalHidden(int rows, const float* hidden) override {
    const int64_t kept = int64_t(hidden_.size()) / config_.hidden_size;
    const int64_t taken = std::clamp<int64_t>(hidden_rows_ - kept, 0, rows);
    hidden_.insert(hidden_.end(), hidden, hidden + taken * config_.hidden_size);
  }

  std::vector<float> LayerMean(int layer, int64_t tokens) const {
    std::vector<float> mean(kv_sums_[layer].size());
    for (size_t i = 0; i < mean.size(); ++i) mean[i] = float(kv_sums_[layer][i] / std::max<int64_t>(1, tokens));
    return mean;
  }
  std::vector<std::vector<float>> Coverage() const {
    std::vector<std::vector<float>> coverage(config_.num_layers, std::vector<float>(config_.num_kv_heads, 1.0f));
    for (int l = 0; l < config_.num_layers; ++l)
      for (int h = 0; h < config_.num_kv_heads; ++h)
        if (coverage_counts_[l] > 0) coverage[l][h] = float(coverage_sums_[l][h] / coverage_counts_[l]);
    return coverage;
  }
  // Quantization's key channel scales ([kv_heads, head_dim]): the RMS of each channel's rotate-half pair over the
  // layer's sampled keys of that head (RoPE only rotates within pairs, so keys before and after it agree), floored
  // at 1% of the head's largest so that a silent channel's rounding noise is not blown up.
  std::vector<float> KeyChannelScales(int layer) const {
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
  Samples DrawSamples(int layer, int rows) {
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
  // keys, values: [samples, head_dim], the sampled vectors in order.
  void StoreSamples(int layer, const Samples& samples, const std::vector<float>& keys,
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

  // coverage: [queries, heads] from attention_coverage over a whole calibration sequence; each KV head gets its
  // query heads' mean.
  void AccumulateCoverage(int layer, int queries, const std::vector<float>& coverage) {
    const int heads = config_.num_heads, group = heads / config_.num_kv_heads;
    for (int i = 0; i < queries; ++i) {
      for (int h = 0; h < heads; ++h)
        coverage_sums_[layer][h / group] += double(coverage[size_t(i) * heads + h]) / group;
      ++coverage_counts_[layer];
    }
  }

#ifdef KVPLAN_WITH_CUDA
  absl::Status ReduceOnDevice(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                              const float* v, cudaStream_t stream) {
    const int kv_dim = config_.kv_dim(), hd = config_.head_dim;
    if (device_sums_.bytes() == 0) {
      KVPLAN_RETURN_IF_ERROR(device_sums_.Allocate(2 * kv_dim * sizeof(double)));
      KVPLAN_RETURN_IF_ERROR(device_coverage_.Allocate(size_t(kCoverageQueries) * config_.num_heads * sizeof(float)));
    }
    KVPLAN_CUDA(cudaMemsetAsync(device_sums_.as<void>(), 0, device_sums_.bytes(), stream));
    KVPLAN_CUDA(cuda::add_column_sums(k_pre_rope, rows, kv_dim, device_sums_.as<double>(), stream));
    KVPLAN_CUDA(cuda::add_column_sums(v, rows, kv_dim, device_sums_.as<double>() + kv_dim, stream));
    const Samples samples = DrawSamples(layer, rows);
    const int sampled = int(samples.vectors.size());
    if (device_gathered_.bytes() < 2 * size_t(sampled) * hd * sizeof(float)) {
      KVPLAN_RETURN_IF_ERROR(device_indices_.Allocate(size_t(sampled) * sizeof(int32_t)));
      KVPLAN_RETURN_IF_ERROR(device_gathered_.Allocate(2 * size_t(sampled) * hd * sizeof(float)));
    }
    std::vector<float> keys(size_t(sampled) * hd), values(keys.size());
    std::vector<double> sums(2 * kv_dim);
    const int queries = std::min(kCoverageQueries, rows);
    std::vector<float> coverage(size_t(queries) * config_.num_heads);
    KVPLAN_CUDA(cudaMemcpyAsync(device_indices_.as<void>(), samples.vectors.data(), sampled * sizeof(int32_t),
                                cudaMemcpyHostToDevice, stream));
    float* gathered = device_gathered_.as<float>();
    KVPLAN_CUDA(cuda::gather_rows(keys_after_rope_ ? k : k_pre_rope, device_indices_.as<int32_t>(), sampled, hd,
                                  gathered, stream));
    KVPLAN_CUDA(cuda::gather_rows(v, device_indices_.as<int32_t>(), sampled, hd, gathered + keys.size(), stream));
    const bool whole_sequence = rows == sequence_length_;
    if (whole_sequence)
      KVPLAN_CUDA(cuda::attention_coverage(q, k, rows, config_.num_heads, config_.num_kv_heads, hd, rows - queries,
                                           kCoverageMass, device_coverage_.as<float>(), stream));
    for (auto [host, device, bytes] :
         {std::tuple{static_cast<void*>(keys.data()), static_cast<const void*>(gathered), keys.size() * sizeof(float)},
          {values.data(), gathered + keys.size(), values.size() * sizeof(float)},
          {sums.data(), device_sums_.as<void>(), sums.size() * sizeof(double)},
          {coverage.data(), device_coverage_.as<void>(), whole_sequence ? coverage.size() * sizeof(float) : 0}})
      KVPLAN_CUDA(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream));
    KVPLAN_CUDA(cudaStreamSynchronize(stream));
    for (int i = 0; i < 2 * kv_dim; ++i) kv_sums_[layer][i] += sums[i];
    StoreSamples(layer, samples, keys, values);
    if (whole_sequence) AccumulateCoverage(layer, queries, coverage);
    return absl::OkStatus();
  }

  DeviceBuffer device_sums_, device_coverage_, device_indices_, device_gathered_;
  absl::Status device_status_;
#endif

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
};

// Forwards to the observer the current stage needs, so one loaded model serves every stage.
class StageObserver : public ForwardObserver {
 public:
  void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                 const float* v) override {
    if (target != nullptr) target->OnLayerKv(layer, rows, q, k, k_pre_rope, v);
  }
  void OnFinalHidden(int rows, const float* hidden) override {
    if (target != nullptr) target->OnFinalHidden(rows, hidden);
  }
  bool OnDeviceLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope, const float* v,
                       void* stream) override {
    return target != nullptr && target->OnDeviceLayerKv(layer, rows, q, k, k_pre_rope, v, stream);
  }
  bool WantsLayerKv() const override { return target != nullptr && target->WantsLayerKv(); }
  ForwardObserver* target = nullptr;
};

// Captures the final hidden states of a candidate model.
class HiddenObserver : public ForwardObserver {
 public:
  void OnLayerKv(int, int, const float*, const float*, const float*, const float*) override {}
  bool WantsLayerKv() const override { return false; }
  void OnFinalHidden(int rows, const float* hidden) override {
    hidden_.insert(hidden_.end(), hidden, hidden + rows * dim_);
  }
  explicit HiddenObserver(int dim) : dim_(dim) {}
  std::vector<float> hidden_;

 private:
  int64_t dim_;
};

// Times the stages of a calibration, reports their progress and samples the device memory in use.
class StageClock {
 public:
  StageClock(const CalibrationProgress& progress, CalibrationReport& report, bool on_device)
      : progress_(progress), report_(report), on_device_(on_device) {}
  ~StageClock() { Finish(); }

  void Progress(const std::string& stage, int64_t done, int64_t total) {
    if (stage != stage_) {
      Finish();
      stage_ = stage;
      start_ = std::chrono::steady_clock::now();
    }
    if (on_device_) report_.peak_device_bytes = std::max(report_.peak_device_bytes, DeviceBytesInUse());
    if (progress_) progress_(stage, done, total);
  }
  // Ends the current stage.
  void Finish() {
    if (stage_.empty()) return;
    report_.stage_seconds.emplace_back(
        stage_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    stage_.clear();
  }

 private:
  const CalibrationProgress& progress_;
  CalibrationReport& report_;
  bool on_device_;
  std::string stage_;
  std::chrono::steady_clock::time_point start_;
};

double MeanCosine(const std::vector<float>& a, const std::vector<float>& b, int dim) {
  double total = 0;
  const int64_t rows = int64_t(a.size()) / dim;
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0, na = 0, nb = 0;
    for (int d = 0; d < dim; ++d) {
      const double x = a[r * dim + d], y = b[r * dim + d];
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    total += dot / std::sqrt(std::max(na * nb, 1e-30));
  }
  return total / std::max<int64_t>(rows, 1);
}

absl::Status RunSequences(Model& model, const std::vector<std::vector<int32_t>>& sequences) {
  for (const auto& sequence : sequences) {
    model.Reset();
    KVPLAN_RETURN_IF_ERROR(model.Forward(SequenceRows(sequence, 0, 0), LogitRows::kLastPerSequence).status());
  }
  return absl::OkStatus();
}

// KVSharer: try layer pairs most dissimilar first; keep a share while the model's last hidden state stays close.
// Every candidate runs on one model, loaded once.
absl::StatusOr<plan::LayerSharing> SearchSharing(const CalibrateOptions& options, const ModelConfig& config,
                                                 const WeightSource& weights, const plan::ModelFingerprint& fingerprint,
                                                 const std::vector<std::vector<int32_t>>& sequences,
                                                 const StatisticsObserver& statistics, int64_t tokens, Model& model,
                                                 StageObserver& observers, StageClock& clock,
                                                 CalibrationReport& report) {
  const int layers = config.num_layers;
  const int limit = options.max_shared_layers >= 0 ? options.max_shared_layers : layers / 3;
  std::vector<std::vector<float>> means(layers);
  for (int l = 0; l < layers; ++l) means[l] = statistics.LayerMean(l, tokens);
  struct Pair {
    int donor, layer;
    float distance;
  };
  std::vector<Pair> pairs;
  for (int i = 0; i < layers; ++i)
    for (int j = i + 1; j < layers; ++j) {
      double distance = 0;
      for (size_t d = 0; d < means[i].size(); ++d)
        distance += double(means[i][d] - means[j][d]) * (means[i][d] - means[j][d]);
      pairs.push_back({i, j, float(std::sqrt(distance))});
    }
  std::stable_sort(pairs.begin(), pairs.end(), [](const Pair& a, const Pair& b) { return a.distance > b.distance; });

  clock.Progress("layer sharing search", 0, int64_t(pairs.size()));
  HiddenObserver observer(config.hidden_size);
  observers.target = &observer;
  plan::LayerSharing sharing;
  sharing.set_cosine_threshold(options.share_cosine_threshold);
  std::set<int> sharers, donors;
  int tried = 0;
  double candidate_seconds = 0;
  for (const Pair& pair : pairs) {
    clock.Progress("layer sharing search", ++tried, int64_t(pairs.size()));
    if (int(sharers.size()) >= limit) break;
    // A sharer stores nothing, so it cannot donate; a donor must keep its own cache.
    if (sharers.contains(pair.layer) || sharers.contains(pair.donor) || donors.contains(pair.layer)) continue;
    plan::Plan candidate;
    *candidate.mutable_model() = fingerprint;
    *candidate.mutable_sharing() = sharing;
    auto* share = candidate.mutable_sharing()->add_shares();
    share->set_layer(pair.layer);
    share->set_donor(pair.donor);
    const auto start = std::chrono::steady_clock::now();
    KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(candidate, config, weights));
    KVPLAN_RETURN_IF_ERROR(model.UsePolicies(std::make_shared<const PlanPolicies>(std::move(policies))));
    observer.hidden_.clear();
    KVPLAN_RETURN_IF_ERROR(RunSequences(model, sequences));
    candidate_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++report.share_candidates;
    const double cosine = MeanCosine(observer.hidden_, statistics.hidden(), config.hidden_size);
    if (cosine < options.share_cosine_threshold) continue;
    share->set_layer_distance(pair.distance);
    share->set_hidden_cosine(float(cosine));
    sharing = candidate.sharing();
    sharers.insert(pair.layer);
    donors.insert(pair.donor);
  }
  if (report.share_candidates > 0) report.seconds_per_share_candidate = candidate_seconds / report.share_candidates;
  observers.target = nullptr;
  return sharing;
}

// Uniformly random token ids: calibration text for a random-weight shape.
std::vector<std::vector<int32_t>> RandomSequences(int vocab_size, int count, int length) {
  std::mt19937 generator(5);
  std::uniform_int_distribution<int32_t> token(0, vocab_size - 1);
  std::vector<std::vector<int32_t>> sequences(count, std::vector<int32_t>(length));
  for (auto& sequence : sequences)
    for (int32_t& id : sequence) id = token(generator);
  return sequences;
}

// The calibration sequences: whole sequence_length pieces of the tokenized data.
absl::StatusOr<std::vector<std::vector<int32_t>>> DataSequences(const CalibrateOptions& options,
                                                                const ModelConfig& config) {
  KVPLAN_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(options.model_dir + "/tokenizer.json"));
  KVPLAN_ASSIGN_OR_RETURN(auto text, ReadTextFile(options.data_path));
  const int64_t wanted = int64_t(options.sequences) * options.sequence_length;
  const std::vector<int32_t> stream = TokenizeDocuments(*tokenizer, SplitDocuments(text), config.bos_token_id, wanted);
  if (int64_t(stream.size()) < options.sequence_length)
    return absl::InvalidArgumentError(absl::StrCat(options.data_path, " holds ", stream.size(),
                                                   " tokens; calibration needs at least ", options.sequence_length));
  std::vector<std::vector<int32_t>> sequences;
  for (int64_t begin = 0; begin + options.sequence_length <= int64_t(stream.size()); begin += options.sequence_length)
    sequences.emplace_back(stream.begin() + begin, stream.begin() + begin + options.sequence_length);
  return sequences;
}

// The planner's inputs every calibration shares: the model, the target and the methods' settings.
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
  inputs.refresh = options.methods.contains("refresh");
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

// Every layer quantized at the options' widths, key channel scales 1 (calibration replaces them).
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

absl::StatusOr<plan::Plan> SyntheticPlan(const CalibrateOptions& options) {
  if (options.methods.contains("share"))
    return absl::InvalidArgumentError(
        "layer sharing is searched on the model's outputs; a random-weight --shape has "
        "none worth keeping (drop share from --methods)");
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, RandomModel(options.model_shape, 1));
  const ModelConfig& config = loaded.config;
  PlannerInputs inputs = BaseInputs(options, config, *loaded.weights);
  inputs.calibration.set_data_path("synthetic: random weights, random unit atoms, uniform attention coverage");
  inputs.calibration.set_tool_version("kvplan 0.1");
  if (options.methods.contains("dict")) {
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
  if (options.methods.contains("quant"))
    inputs.quantization = QuantizationSettings(options, config.num_layers, config.kv_dim());
  if (options.methods.contains("budget"))
    inputs.attention_coverage =
        std::vector<std::vector<float>>(config.num_layers, std::vector<float>(config.num_kv_heads, 0.1f));
  return CompilePlan(inputs);
}

// A sequence whose next-token distributions are compared on rows [scored_begin, scored_end).
struct ScoredSequence {
  std::vector<int32_t> tokens;
  int scored_begin = 0, scored_end = 0;
};

std::vector<ScoredSequence> WhollyScored(const std::vector<std::vector<int32_t>>& sequences) {
  std::vector<ScoredSequence> scored;
  for (const auto& tokens : sequences) scored.push_back({tokens, 0, int(tokens.size())});
  return scored;
}

// Retrieval probes: calibration text with a pass-key sentence hidden at depths spread evenly over the probes and
// the question at the end; only the rows that predict the answer's tokens are scored, so a setting that loses the
// key shows there. The haystack is calibration text, unlike eval's needle filler, and the keys are others.
absl::StatusOr<std::vector<ScoredSequence>> RetrievalProbes(const Tokenizer& tokenizer,
                                                            const std::vector<std::vector<int32_t>>& haystacks,
                                                            int count) {
  std::mt19937 generator(77);
  std::uniform_int_distribution<int> pass_key(10000, 99999);
  std::vector<ScoredSequence> probes;
  for (int i = 0; i < count; ++i) {
    const std::vector<int32_t>& haystack = haystacks[i % haystacks.size()];
    const std::string key = std::to_string(pass_key(generator));
    const std::vector<int32_t> needle =
        tokenizer.Encode(absl::StrCat(" The pass key is ", key, ". Remember it. ", key, " is the pass key."));
    const std::vector<int32_t> question = tokenizer.Encode(" What is the pass key? The pass key is");
    const std::vector<int32_t> answer = tokenizer.Encode(absl::StrCat(" ", key));
    const int64_t tail = int64_t(needle.size() + question.size() + answer.size());
    if (int64_t(haystack.size()) < tail + 16)
      return absl::InvalidArgumentError("calibration sequences are too short for retrieval probes");
    const int64_t filler = int64_t(haystack.size()) - tail;
    const int64_t depth = 1 + (filler - 1) * (2 * i + 1) / (2 * count);  // after BOS
    ScoredSequence probe;
    probe.tokens.assign(haystack.begin(), haystack.begin() + depth);
    probe.tokens.insert(probe.tokens.end(), needle.begin(), needle.end());
    probe.tokens.insert(probe.tokens.end(), haystack.begin() + depth, haystack.begin() + filler);
    probe.tokens.insert(probe.tokens.end(), question.begin(), question.end());
    probe.scored_begin = int(probe.tokens.size()) - 1;  // the row after the question predicts the answer
    probe.tokens.insert(probe.tokens.end(), answer.begin(), answer.end());
    probe.scored_end = int(probe.tokens.size()) - 1;
    probes.push_back(std::move(probe));
  }
  return probes;
}

// Next-token distributions of sequences under one cache plan, compared with the full cache's.
class DistributionComparison {
 public:
  DistributionComparison(Model& model, std::vector<ScoredSequence> sequences)
      : model_(model), sequences_(std::move(sequences)) {}

  // The full cache's logits on the scored rows, kept for every later comparison.
  absl::Status RunReference() {
    KVPLAN_RETURN_IF_ERROR(model_.UsePolicies(nullptr));
    reference_.clear();
    for (const ScoredSequence& sequence : sequences_) {
      KVPLAN_ASSIGN_OR_RETURN(auto logits, ScoredLogits(sequence));
      reference_.push_back(std::move(logits));
    }
    return absl::OkStatus();
  }

  struct Result {
    double kl = 0, top1_agreement = 0;
    int64_t tokens = 0;
  };
  // Mean KL divergence per scored row from the reference, and how often both pick the same next token; under the
  // policies the model was last given.
  absl::StatusOr<Result> Compare() {
    const int vocab = model_.config().vocab_size;
    Result result;
    double kl = 0, agreed = 0;
    for (size_t i = 0; i < sequences_.size(); ++i) {
      KVPLAN_ASSIGN_OR_RETURN(auto logits, ScoredLogits(sequences_[i]));
      const int64_t rows = sequences_[i].scored_end - sequences_[i].scored_begin;
      for (int64_t r = 0; r < rows; ++r) {
        const float* reference = reference_[i].data() + r * vocab;
        const float* row = logits.data() + r * vocab;
        const LogitRow reference_row(reference, vocab), candidate_row(row, vocab);
        // A non-finite logit would otherwise count as no loss at all (KL is clamped at 0).
        if (!std::isfinite(reference_row.log_partition) || !std::isfinite(candidate_row.log_partition))
          return absl::InternalError(absl::StrCat("non-finite logits at row ", sequences_[i].scored_begin + r,
                                                  " of a calibration sequence under a candidate plan on ",
                                                  model_.device_name()));
        kl += KlDivergence(reference_row, candidate_row);
        agreed += Argmax(reference, vocab) == Argmax(row, vocab) ? 1 : 0;
      }
      result.tokens += rows;
    }
    result.kl = kl / std::max<int64_t>(1, result.tokens);
    result.top1_agreement = agreed / std::max<int64_t>(1, result.tokens);
    return result;
  }
  bool empty() const { return sequences_.empty(); }

 private:
  absl::StatusOr<std::vector<float>> ScoredLogits(const ScoredSequence& sequence) {
    model_.Reset();
    KVPLAN_ASSIGN_OR_RETURN(auto logits, model_.Forward(SequenceRows(sequence.tokens, 0, 0), LogitRows::kAll));
    const int64_t vocab = model_.config().vocab_size;
    return std::vector<float>(logits.begin() + sequence.scored_begin * vocab,
                              logits.begin() + sequence.scored_end * vocab);
  }

  Model& model_;
  std::vector<ScoredSequence> sequences_;
  std::vector<std::vector<float>> reference_;
};

// Text and retrieval probes compared together: what one plan costs on each.
struct PlanLoss {
  DistributionComparison::Result text, probes;
};
class PlanLossMeter {
 public:
  PlanLossMeter(Model& model, std::vector<ScoredSequence> text, std::vector<ScoredSequence> probes)
      : model_(model), text_(model, std::move(text)), probes_(model, std::move(probes)) {}
  absl::Status RunReference() {
    KVPLAN_RETURN_IF_ERROR(text_.RunReference());
    return probes_.RunReference();
  }
  absl::StatusOr<PlanLoss> Measure(std::shared_ptr<const PlanPolicies> policies) {
    KVPLAN_RETURN_IF_ERROR(model_.UsePolicies(std::move(policies)));
    PlanLoss loss;
    KVPLAN_ASSIGN_OR_RETURN(loss.text, text_.Compare());
    if (!probes_.empty()) {
      KVPLAN_ASSIGN_OR_RETURN(loss.probes, probes_.Compare());
    }
    return loss;
  }

 private:
  Model& model_;
  DistributionComparison text_, probes_;
};

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

// The policies of `base` (the accepted shares) with one layer's setting changed.
std::shared_ptr<const PlanPolicies> WithLayerSetting(const PlanPolicies& base, const PlannerInputs& inputs, int layer,
                                                     const LayerSetting& setting) {
  auto policies = std::make_shared<PlanPolicies>(base);
  ApplyLayerSetting(inputs, layer, setting, *policies);
  return policies;
}

// The quality optimiser's measurements: every layer (sharers aside) under every combination of the options'
// widths and fractions, alone, on `text` and the retrieval `probes`; the losses are the KL added to the base
// plan's (the shares').
absl::StatusOr<std::vector<std::vector<MeasuredSetting>>> MeasureSettings(
    const CalibrateOptions& options, const ModelConfig& config, const WeightSource& weights,
    const PlannerInputs& inputs, std::vector<ScoredSequence> text, std::vector<ScoredSequence> probes, Model& model,
    StageClock& clock) {
  std::vector<LayerSetting> settings;
  std::vector<int> widths = {16};
  widths.insert(widths.end(), options.optimiser_widths.begin(), options.optimiser_widths.end());
  std::vector<float> fractions = {1.0f};
  fractions.insert(fractions.end(), options.optimiser_keep_fractions.begin(), options.optimiser_keep_fractions.end());
  for (int bits : widths)
    for (float fraction : fractions)
      if (bits < 16 || fraction < 1.0f) settings.push_back({bits, fraction});
  plan::Plan base_plan;
  *base_plan.mutable_model() = inputs.model;
  *base_plan.mutable_sharing() = inputs.sharing;
  KVPLAN_ASSIGN_OR_RETURN(PlanPolicies base, PoliciesFromPlan(base_plan, config, weights));
  std::set<int> sharers;
  for (const auto& share : inputs.sharing.shares()) sharers.insert(share.layer());

  const int64_t total = int64_t(config.num_layers + 1) * int64_t(settings.size());
  clock.Progress("optimiser: measuring settings", 0, total);
  PlanLossMeter meter(model, std::move(text), std::move(probes));
  KVPLAN_RETURN_IF_ERROR(meter.RunReference());
  KVPLAN_ASSIGN_OR_RETURN(const PlanLoss base_loss, meter.Measure(std::make_shared<const PlanPolicies>(base)));
  auto added = [&](const PlanLoss& loss, const LayerSetting& setting) {
    return MeasuredSetting{.setting = setting,
                           .kl = std::max(0.0, loss.text.kl - base_loss.text.kl),
                           .probe_kl = std::max(0.0, loss.probes.kl - base_loss.probes.kl)};
  };
  std::vector<std::vector<MeasuredSetting>> measured(config.num_layers);
  int64_t done = 0;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    for (const LayerSetting& setting : settings) {
      clock.Progress("optimiser: measuring settings", done++, total);
      if (sharers.contains(layer)) continue;
      KVPLAN_ASSIGN_OR_RETURN(const PlanLoss loss, meter.Measure(WithLayerSetting(base, inputs, layer, setting)));
      measured[layer].push_back(added(loss, setting));
    }
  }
  // One layer compressed while the rest stay exact hides most of its damage in a deep model (llama-dev-16l: the
  // layers' losses summed to 1/40 of what their plan verified at). Each setting is also measured on every layer
  // at once, and the layers' losses are rescaled to add up to that, keeping their proportions: the layers rank as
  // measured alone, at the magnitude they cost together.
  for (size_t i = 0; i < settings.size(); ++i) {
    clock.Progress("optimiser: measuring settings", done++, total);
    auto everywhere = std::make_shared<PlanPolicies>(base);
    std::vector<int> layers;
    for (int layer = 0; layer < config.num_layers; ++layer) {
      if (sharers.contains(layer)) continue;
      layers.push_back(layer);
      ApplyLayerSetting(inputs, layer, settings[i], *everywhere);
    }
    KVPLAN_ASSIGN_OR_RETURN(const PlanLoss loss, meter.Measure(everywhere));
    const MeasuredSetting joint = added(loss, settings[i]);
    auto rescale = [&](double MeasuredSetting::*field) {
      double sum = 0;
      for (int layer : layers) sum += measured[layer][i].*field;
      for (int layer : layers)
        measured[layer][i].*field =
            sum > 0 ? measured[layer][i].*field * (joint.*field / sum) : joint.*field / double(layers.size());
    };
    rescale(&MeasuredSetting::kl);
    rescale(&MeasuredSetting::probe_kl);
  }
  clock.Progress("optimiser: measuring settings", total, total);
  return measured;
}

// The chosen plan, whole, on text and probes the measurements did not see.
absl::Status VerifyPlan(const ModelConfig& config, const WeightSource& weights, std::vector<ScoredSequence> text,
                        std::vector<ScoredSequence> probes, Model& model, StageClock& clock, plan::Plan& plan) {
  clock.Progress("optimiser: verifying the plan", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(plan, config, weights));
  PlanLossMeter meter(model, std::move(text), std::move(probes));
  KVPLAN_RETURN_IF_ERROR(meter.RunReference());
  KVPLAN_ASSIGN_OR_RETURN(const PlanLoss loss,
                          meter.Measure(std::make_shared<const PlanPolicies>(std::move(policies))));
  plan::OptimiserDecisions* decisions = plan.mutable_optimiser();
  decisions->set_verified_kl(loss.text.kl);
  decisions->set_verified_top1_agreement(loss.text.top1_agreement);
  decisions->set_verified_tokens(loss.text.tokens);
  decisions->set_verified_probe_kl(loss.probes.kl);
  decisions->set_verified_probe_top1_agreement(loss.probes.top1_agreement);
  clock.Progress("optimiser: verifying the plan", 1, 1);
  return absl::OkStatus();
}

}  // namespace

const std::set<std::string>& KnownMethods() {
  static const std::set<std::string> methods = {"share", "dict", "quant", "budget", "refresh", "optimise"};
  return methods;
}

absl::StatusOr<plan::Plan> Calibrate(const CalibrateOptions& options, const CalibrationProgress& progress,
                                     CalibrationReport* report) {
  for (const std::string& method : options.methods)
    if (!KnownMethods().contains(method))
      return absl::InvalidArgumentError(
          absl::StrCat("unknown method \"", method, "\" (known: ", absl::StrJoin(KnownMethods(), ", "), ")"));
  if (!(options.target_memory_ratio > 0.0f && options.target_memory_ratio <= 1.0f))
    return absl::InvalidArgumentError("--target-memory must be in (0, 1]: the plan's bytes over the full cache's");
  if (options.model_dir.empty() == options.model_shape.empty())
    return absl::InvalidArgumentError("give exactly one of --model and --shape");
  if (options.random_tokens && options.model_shape.empty())
    return absl::InvalidArgumentError("--random-tokens calibrates a --shape; a checkpoint calibrates on --data");
  if (options.dictionary_atoms > 65536) return absl::InvalidArgumentError("at most 65536 atoms (16-bit indices)");
  if (options.methods.contains("dict") && options.methods.contains("quant"))
    return absl::InvalidArgumentError("dict and quant both code every layer: choose one");
  if (options.methods.contains("optimise"))
    for (const char* method : {"dict", "quant", "budget"})
      if (options.methods.contains(method))
        return absl::InvalidArgumentError(
            absl::StrCat("optimise chooses quantization and budgets itself; drop ", method, " from the methods"));
  for (int bits : options.optimiser_widths)
    if (!IsQuantizationWidth(bits))
      return absl::InvalidArgumentError(absl::StrCat("optimiser width ", bits, " is not 2, 4 or 8 bits"));
  for (float fraction : options.optimiser_keep_fractions)
    if (!(fraction > 0.0f && fraction <= 1.0f))
      return absl::InvalidArgumentError(absl::StrCat("optimiser keep fraction ", fraction, " is not in (0, 1]"));
  if (!IsQuantizationWidth(options.key_bits) || !IsQuantizationWidth(options.value_bits))
    return absl::InvalidArgumentError(
        absl::StrCat("quantization widths are 2, 4 or 8 bits, not ", options.key_bits, " and ", options.value_bits));
  if (!options.model_shape.empty() && !options.random_tokens) return SyntheticPlan(options);
  if (options.model_shape.empty() && options.data_path.empty())
    return absl::InvalidArgumentError("calibrating a checkpoint needs --data");

  CalibrationReport local_report;
  CalibrationReport& cost = report != nullptr ? *report : local_report;
  cost = CalibrationReport();
  const bool on_device = ResolveBackend(options.device) == Backend::kCuda;
  StageClock clock(progress, cost, on_device);
  clock.Progress("loading the model", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(auto loaded, options.model_shape.empty() ? OpenModel(options.model_dir)
                                                                   : RandomModel(options.model_shape, 1));
  const ModelConfig& config = loaded.config;
  std::vector<std::vector<int32_t>> sequences;
  if (options.random_tokens) {
    sequences = RandomSequences(config.vocab_size, options.sequences, options.sequence_length);
  } else {
    KVPLAN_ASSIGN_OR_RETURN(sequences, DataSequences(options, config));
  }
  clock.Progress("loading the model", 1, 1);
  const int64_t tokens = int64_t(sequences.size()) * options.sequence_length;
  const std::vector<std::vector<int32_t>> share_sequences(
      sequences.begin(), sequences.begin() + std::clamp<int64_t>(options.share_sequences, 1, sequences.size()));

  StatisticsObserver statistics(
      config, options.max_training_vectors, options.sequence_length, options.keys_after_rope,
      options.methods.contains("share") ? int64_t(share_sequences.size()) * options.sequence_length : 0);
  clock.Progress("statistics", 0, int64_t(sequences.size()));
  StageObserver observers;
  KVPLAN_ASSIGN_OR_RETURN(auto model, CreateModel(config, *loaded.weights,
                                                  {.backend = options.device,
                                                   .capacity = options.sequence_length,
                                                   .max_rows = options.sequence_length,
                                                   .observer = &observers}));
  cost.device = model->device_name();
  observers.target = &statistics;
  for (size_t i = 0; i < sequences.size(); ++i) {
    model->Reset();
    KVPLAN_ASSIGN_OR_RETURN(auto logits, model->Forward(SequenceRows(sequences[i], 0, 0), LogitRows::kLastPerSequence));
    clock.Progress("statistics", int64_t(i) + 1, int64_t(sequences.size()));
#ifdef KVPLAN_WITH_CUDA
    KVPLAN_RETURN_IF_ERROR(statistics.device_status());
#endif
  }
  observers.target = nullptr;

  PlannerInputs inputs = BaseInputs(options, config, *loaded.weights);
  inputs.calibration.set_data_path(options.random_tokens ? "random token ids" : options.data_path);
  inputs.calibration.set_tokens(tokens);
  inputs.calibration.set_sequences(int(sequences.size()));
  inputs.calibration.set_sequence_length(options.sequence_length);
  inputs.calibration.set_tool_version("kvplan 0.1");

  if (options.methods.contains("share")) {
    KVPLAN_ASSIGN_OR_RETURN(auto sharing, SearchSharing(options, config, *loaded.weights, inputs.model, share_sequences,
                                                        statistics, tokens, *model, observers, clock, cost));
    inputs.sharing = std::move(sharing);
  }
  if (options.methods.contains("quant") || options.methods.contains("optimise")) {
    inputs.quantization = QuantizationSettings(options, config.num_layers, config.kv_dim());
    for (int layer = 0; layer < config.num_layers; ++layer) {
      const std::vector<float> scales = statistics.KeyChannelScales(layer);
      inputs.quantization.mutable_layers(layer)->mutable_key_channel_scale()->Assign(scales.begin(), scales.end());
    }
  }
  std::vector<ScoredSequence> verify_text, verify_probes;
  if (options.methods.contains("optimise")) {
    const int64_t measured = options.optimiser_sequences, verified = options.verify_sequences;
    if (measured < 1 || verified < 1 || int64_t(sequences.size()) < measured + verified)
      return absl::InvalidArgumentError(absl::StrCat("the optimiser measures on ", measured, " and verifies on ",
                                                     verified, " other calibration sequences; the data holds ",
                                                     sequences.size()));
    const std::vector<std::vector<int32_t>> measure_sequences(sequences.begin(), sequences.begin() + measured);
    const std::vector<std::vector<int32_t>> held_back(sequences.end() - verified, sequences.end());
    std::vector<ScoredSequence> probes;
    if (options.retrieval_probes > 0 && !options.random_tokens) {
      KVPLAN_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(options.model_dir + "/tokenizer.json"));
      KVPLAN_ASSIGN_OR_RETURN(probes, RetrievalProbes(*tokenizer, measure_sequences, options.retrieval_probes));
      KVPLAN_ASSIGN_OR_RETURN(verify_probes, RetrievalProbes(*tokenizer, held_back, options.retrieval_probes));
    }
    verify_text = WhollyScored(held_back);
    inputs.retrieval_weight = options.retrieval_weight;
    KVPLAN_ASSIGN_OR_RETURN(inputs.measured_settings,
                            MeasureSettings(options, config, *loaded.weights, inputs, WhollyScored(measure_sequences),
                                            std::move(probes), *model, clock));
  }
  // Its device memory goes back before dictionary training; the optimiser (never with dictionaries) verifies on it.
  if (verify_text.empty()) model.reset();
  std::set<int> sharers;
  for (const auto& share : inputs.sharing.shares()) sharers.insert(share.layer());

  if (options.methods.contains("dict")) {
    plan::SparseCoding& coding = inputs.sparse_coding;
    coding = CodingSettings(options);
    auto learn = [&](const std::vector<float>& samples, int sparsity) -> absl::StatusOr<plan::Dictionary> {
      if (on_device)
        return LearnDictionaryOnDevice(samples, config.head_dim, options.dictionary_atoms, sparsity,
                                       options.dictionary_epochs);
      return LearnDictionary(samples, config.head_dim, options.dictionary_atoms, sparsity, options.dictionary_epochs);
    };
    for (int layer = 0; layer < config.num_layers; ++layer) {
      clock.Progress("dictionaries", layer, config.num_layers);
      if (sharers.contains(layer)) continue;
      auto* entry = coding.add_layers();
      entry->set_layer(layer);
      KVPLAN_ASSIGN_OR_RETURN(*entry->mutable_keys(), learn(statistics.key_samples(layer), options.key_sparsity));
      KVPLAN_ASSIGN_OR_RETURN(*entry->mutable_values(), learn(statistics.value_samples(layer), options.value_sparsity));
    }
    clock.Progress("dictionaries", config.num_layers, config.num_layers);
  }
  if (options.methods.contains("budget")) inputs.attention_coverage = statistics.Coverage();
  clock.Progress("compiling the plan", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(plan::Plan plan, CompilePlan(inputs));
  clock.Progress("compiling the plan", 1, 1);
  if (!verify_text.empty())
    KVPLAN_RETURN_IF_ERROR(
        VerifyPlan(config, *loaded.weights, std::move(verify_text), std::move(verify_probes), *model, clock, plan));
  clock.Finish();
  return plan;
}

}  // namespace kvplan
