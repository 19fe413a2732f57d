#include "runtime/cpu_model.h"

#include <cblas.h>

#include <cmath>
#include <numeric>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu_reference.h"

namespace kvplan {
namespace {

struct CpuLayer {
  std::vector<float> attention_norm;
  std::vector<float> qkv;       // [q_dim + 2 kv_dim, hidden]: q, k and v projections stacked for one GEMM
  std::vector<float> qkv_bias;  // [q_dim + 2 kv_dim] or empty
  std::vector<float> o;         // [hidden, q_dim]
  std::vector<float> mlp_norm;
  std::vector<float> gate_up;   // [2 ffn, hidden]: gate then up
  std::vector<float> down;      // [hidden, ffn]
};

// y[rows, out] (+)= x[rows, in] * w[out, in]^T
void MatMulTransposed(const float* x, const float* w, int rows, int in, int out, float* y, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in, w, in, accumulate ? 1.0f : 0.0f,
              y, out);
}

absl::StatusOr<std::vector<float>> ReadStacked(const WeightSource& weights, std::vector<TensorSpec> specs) {
  std::vector<float> stacked;
  for (const TensorSpec& spec : specs) {
    absl::StatusOr<std::vector<float>> part = weights.Read(spec);
    if (!part.ok()) return part.status();
    stacked.insert(stacked.end(), part->begin(), part->end());
  }
  return stacked;
}

class CpuModel : public Model {
 public:
  CpuModel(const ModelConfig& config, const CpuModelOptions& options)
      : config_(config),
        num_sequences_(options.num_sequences),
        capacity_(options.capacity > 0 ? options.capacity : int(config.max_position_embeddings)),
        inv_freq_(RopeInverseFrequencies(config)) {}

  absl::Status Load(const WeightSource& weights) {
    absl::StatusOr<std::vector<float>> embed = weights.Read(EmbeddingSpec(config_));
    if (!embed.ok()) return embed.status();
    embed_ = std::move(*embed);
    absl::StatusOr<std::vector<float>> norm = weights.Read(FinalNormSpec(config_));
    if (!norm.ok()) return norm.status();
    final_norm_ = std::move(*norm);
    if (!config_.tie_word_embeddings) {
      absl::StatusOr<std::vector<float>> head = weights.Read(LmHeadSpec(config_));
      if (!head.ok()) return head.status();
      lm_head_ = std::move(*head);
    }
    for (int l = 0; l < config_.num_layers; ++l) {
      const LayerSpecs specs = LayerTensorSpecs(config_, l);
      CpuLayer layer;
      std::vector<std::pair<std::vector<float>*, std::vector<TensorSpec>>> parts = {
          {&layer.attention_norm, {specs.attention_norm}}, {&layer.qkv, {specs.q, specs.k, specs.v}},
          {&layer.o, {specs.o}}, {&layer.mlp_norm, {specs.mlp_norm}}, {&layer.gate_up, {specs.gate, specs.up}},
          {&layer.down, {specs.down}}};
      if (config_.attention_bias) parts.push_back({&layer.qkv_bias, {specs.q_bias, specs.k_bias, specs.v_bias}});
      for (auto& [target, part_specs] : parts) {
        absl::StatusOr<std::vector<float>> values = ReadStacked(weights, part_specs);
        if (!values.ok()) return values.status();
        *target = std::move(*values);
      }
      layers_.push_back(std::move(layer));
    }
    const int64_t cache_floats =
        int64_t(config_.num_layers) * num_sequences_ * config_.num_kv_heads * capacity_ * config_.head_dim;
    k_cache_.assign(cache_floats, 0.0f);
    v_cache_.assign(cache_floats, 0.0f);
    lengths_.assign(num_sequences_, 0);
    entry_positions_.resize(capacity_);
    std::iota(entry_positions_.begin(), entry_positions_.end(), 0);
    return absl::OkStatus();
  }

  const ModelConfig& config() const override { return config_; }
  int num_sequences() const override { return num_sequences_; }
  int capacity() const override { return capacity_; }
  std::string device_name() const override { return "cpu"; }
  void Reset() override { std::fill(lengths_.begin(), lengths_.end(), 0); }

  int64_t kv_cache_bytes(int context) const override {
    return int64_t(num_sequences_) * context * config_.kv_bytes_per_token(sizeof(float));
  }

  int64_t weight_bytes() const override { return config_.parameter_count() * int64_t(sizeof(float)); }

  absl::Status FillCacheWithNoise(int context) override {
    if (context > capacity_) return absl::OutOfRangeError(absl::StrCat("context ", context, " > capacity ", capacity_));
    std::mt19937 generator(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& value : k_cache_) value = normal(generator);
    for (float& value : v_cache_) value = normal(generator);
    std::fill(lengths_.begin(), lengths_.end(), context);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> Forward(const StepRows& rows, LogitRows which) override {
    if (absl::Status status = ValidateStepRows(rows, config_, lengths_, capacity_); !status.ok()) return status;
    const ModelConfig& c = config_;
    const int T = int(rows.tokens.size());
    const int hidden = c.hidden_size, q_dim = c.q_dim(), kv_dim = c.kv_dim(), ffn = c.intermediate_size;
    const int qkv_dim = q_dim + 2 * kv_dim;
    std::vector<float> x(int64_t(T) * hidden), normed(x.size()), qkv(int64_t(T) * qkv_dim);
    std::vector<float> q(int64_t(T) * q_dim), k(int64_t(T) * kv_dim), v(int64_t(T) * kv_dim);
    std::vector<float> attention_out(int64_t(T) * q_dim), gate_up(int64_t(T) * 2 * ffn), activated(int64_t(T) * ffn);
    for (int t = 0; t < T; ++t)
      std::copy_n(embed_.data() + int64_t(rows.tokens[t]) * hidden, hidden, x.data() + int64_t(t) * hidden);

    for (int l = 0; l < c.num_layers; ++l) {
      const CpuLayer& layer = layers_[l];
      cpu::rms_norm(x.data(), layer.attention_norm.data(), T, hidden, c.rms_norm_eps, normed.data());
      MatMulTransposed(normed.data(), layer.qkv.data(), T, hidden, qkv_dim, qkv.data(), false);
      if (!layer.qkv_bias.empty()) cpu::add_row_bias(qkv.data(), layer.qkv_bias.data(), T, qkv_dim);
      for (int t = 0; t < T; ++t) {
        const float* row = qkv.data() + int64_t(t) * qkv_dim;
        std::copy_n(row, q_dim, q.data() + int64_t(t) * q_dim);
        std::copy_n(row + q_dim, kv_dim, k.data() + int64_t(t) * kv_dim);
        std::copy_n(row + q_dim + kv_dim, kv_dim, v.data() + int64_t(t) * kv_dim);
      }
      const float attention_factor = float(c.rope.attention_factor);
      cpu::apply_rope(q.data(), rows.positions.data(), inv_freq_.data(), T, c.num_heads, c.head_dim, attention_factor);
      cpu::apply_rope(k.data(), rows.positions.data(), inv_freq_.data(), T, c.num_kv_heads, c.head_dim,
                      attention_factor);
      for (int t = 0; t < T; ++t) {
        for (int h = 0; h < c.num_kv_heads; ++h) {
          const int64_t entry = CacheOffset(l, rows.sequences[t], h) + int64_t(rows.positions[t]) * c.head_dim;
          std::copy_n(k.data() + (int64_t(t) * c.num_kv_heads + h) * c.head_dim, c.head_dim, k_cache_.data() + entry);
          std::copy_n(v.data() + (int64_t(t) * c.num_kv_heads + h) * c.head_dim, c.head_dim, v_cache_.data() + entry);
        }
      }
      Attend(l, rows, q.data(), attention_out.data());
      MatMulTransposed(attention_out.data(), layer.o.data(), T, q_dim, hidden, x.data(), true);

      cpu::rms_norm(x.data(), layer.mlp_norm.data(), T, hidden, c.rms_norm_eps, normed.data());
      MatMulTransposed(normed.data(), layer.gate_up.data(), T, hidden, 2 * ffn, gate_up.data(), false);
      for (int t = 0; t < T; ++t) {
        const float* row = gate_up.data() + int64_t(t) * 2 * ffn;
        cpu::swiglu(row, row + ffn, ffn, activated.data() + int64_t(t) * ffn);
      }
      MatMulTransposed(activated.data(), layer.down.data(), T, ffn, hidden, x.data(), true);
    }
    for (int t = 0; t < T; ++t) lengths_[rows.sequences[t]] = rows.positions[t] + 1;

    std::vector<int> logit_rows;
    for (int t = 0; t < T; ++t)
      if (which == LogitRows::kAll || t + 1 == T || rows.sequences[t + 1] != rows.sequences[t]) logit_rows.push_back(t);
    std::vector<float> selected(logit_rows.size() * hidden);
    for (size_t i = 0; i < logit_rows.size(); ++i)
      std::copy_n(x.data() + int64_t(logit_rows[i]) * hidden, hidden, selected.data() + i * hidden);
    cpu::rms_norm(selected.data(), final_norm_.data(), int64_t(logit_rows.size()), hidden, c.rms_norm_eps,
                  selected.data());
    std::vector<float> logits(logit_rows.size() * c.vocab_size);
    const std::vector<float>& head = c.tie_word_embeddings ? embed_ : lm_head_;
    MatMulTransposed(selected.data(), head.data(), int(logit_rows.size()), hidden, c.vocab_size, logits.data(), false);
    return logits;
  }

 private:
  int64_t CacheOffset(int layer, int sequence, int kv_head) const {
    return ((int64_t(layer) * num_sequences_ + sequence) * config_.num_kv_heads + kv_head) * capacity_ *
           config_.head_dim;
  }


  void Attend(int layer, const StepRows& rows, const float* q, float* out) {
    const ModelConfig& c = config_;
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    std::vector<cpu::KvHeadView> views(c.num_kv_heads);
    const int T = int(rows.tokens.size());
    for (int begin = 0; begin < T;) {
      int end = begin + 1;
      while (end < T && rows.sequences[end] == rows.sequences[begin]) ++end;
      const int sequence = rows.sequences[begin];
      for (int h = 0; h < c.num_kv_heads; ++h) {
        const int64_t offset = CacheOffset(layer, sequence, h);
        views[h] = {k_cache_.data() + offset, v_cache_.data() + offset, entry_positions_.data(), nullptr,
                    rows.positions[end - 1] + 1};
      }
      const int64_t row_stride = int64_t(c.q_dim());
      cpu::attention(q + begin * row_stride, rows.positions.data() + begin, end - begin, c.num_heads, views.data(),
                     c.num_kv_heads, c.head_dim, scale, c.sliding_window, out + begin * row_stride);
      begin = end;
    }
  }

  ModelConfig config_;
  int num_sequences_;
  int capacity_;
  std::vector<float> inv_freq_;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<CpuLayer> layers_;
  std::vector<float> k_cache_, v_cache_;  // [layer, sequence, kv_head, capacity, head_dim]
  std::vector<int32_t> lengths_;
  std::vector<int32_t> entry_positions_;  // entry j of a dense cache holds position j
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                      const CpuModelOptions& options) {
  if (options.num_sequences <= 0) return absl::InvalidArgumentError("num_sequences must be positive");
  auto model = std::make_unique<CpuModel>(config, options);
  if (absl::Status status = model->Load(weights); !status.ok()) return status;
  return model;
}

}  // namespace kvplan
