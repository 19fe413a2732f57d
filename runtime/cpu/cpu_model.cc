#include "runtime/cpu/cpu_model.h"

#include <cblas.h>

#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cpu/elementwise.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

struct CpuLayer {
  std::vector<float> attention_norm;
  // [q_dim + 2 kv_dim, hidden]: q, k and v stacked for one GEMM; its first q_dim rows alone give q.
  std::vector<float> qkv;
  std::vector<float> qkv_bias;  // [q_dim + 2 kv_dim] or empty
  std::vector<float> o;         // [hidden, q_dim]
  std::vector<float> mlp_norm;
  std::vector<float> gate_up;  // [2 ffn, hidden]: gate then up
  std::vector<float> down;     // [hidden, ffn]
};

// y[rows, out] (+)= x[rows, in] * w[out, in]^T
void MatMulTransposed(const float* x, const float* w, int rows, int in, int out, float* y, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, in, w, in, accumulate ? 1.0f : 0.0f, y,
              out);
}

absl::StatusOr<std::vector<float>> ReadStacked(const WeightSource& weights, const std::vector<TensorSpec>& specs) {
  std::vector<float> stacked;
  for (const TensorSpec& spec : specs) {
    KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> part, weights.Read(spec));
    stacked.insert(stacked.end(), part.begin(), part.end());
  }
  return stacked;
}

class CpuModel : public Model {
 public:
  CpuModel(const ModelConfig& config, const CpuModelOptions& options)
      : config_(config),
        options_(options),
        capacity_(options.capacity > 0 ? options.capacity : int(config.max_position_embeddings)),
        inv_freq_(RopeInverseFrequencies(config)) {}

  absl::Status Load(const WeightSource& weights) {
    KVPLAN_ASSIGN_OR_RETURN(embed_, weights.Read(EmbeddingSpec(config_)));
    KVPLAN_ASSIGN_OR_RETURN(final_norm_, weights.Read(FinalNormSpec(config_)));
    if (!config_.tie_word_embeddings) {
      KVPLAN_ASSIGN_OR_RETURN(lm_head_, weights.Read(LmHeadSpec(config_)));
    }
    for (int l = 0; l < config_.num_layers; ++l) {
      const LayerSpecs specs = LayerTensorSpecs(config_, l);
      CpuLayer layer;
      std::vector<std::pair<std::vector<float>*, std::vector<TensorSpec>>> parts = {
          {&layer.attention_norm, {specs.attention_norm}},
          {&layer.qkv, {specs.q, specs.k, specs.v}},
          {&layer.o, {specs.o}},
          {&layer.mlp_norm, {specs.mlp_norm}},
          {&layer.gate_up, {specs.gate, specs.up}},
          {&layer.down, {specs.down}}};
      if (config_.attention_bias) parts.push_back({&layer.qkv_bias, {specs.q_bias, specs.k_bias, specs.v_bias}});
      for (auto& [target, part_specs] : parts) {
        KVPLAN_ASSIGN_OR_RETURN(*target, ReadStacked(weights, part_specs));
      }
      layers_.push_back(std::move(layer));
    }
    return BuildCaches();
  }

  absl::Status UsePolicies(std::shared_ptr<const PlanPolicies> policies) override {
    options_.cache_factory = policies ? PlanCacheFactory(std::move(policies)) : LayerCacheFactory();
    options_.chunk_rows = options_.cache_factory ? kPlannedChunkRows : 0;
    options_.device_label = options_.cache_factory ? "cpu+plan" : "cpu";
    return BuildCaches();
  }

  const ModelConfig& config() const override { return config_; }
  int num_sequences() const override { return options_.num_sequences; }
  int capacity() const override { return capacity_; }
  std::string device_name() const override { return options_.device_label; }
  int64_t weight_bytes() const override { return config_.parameter_count() * int64_t(sizeof(float)); }

  void Reset() override {
    std::fill(lengths_.begin(), lengths_.end(), 0);
    for (auto& cache : caches_) cache->Reset();
  }

  absl::Status ResetSequence(int sequence) override {
    KVPLAN_RETURN_IF_ERROR(CheckSequence(sequence, options_.num_sequences));
    lengths_[sequence] = 0;
    for (auto& cache : caches_) cache->ResetSequence(sequence);
    return absl::OkStatus();
  }

  int64_t kv_cache_bytes() const override {
    int64_t total = 0;
    for (const auto& cache : caches_) total += cache->bytes();
    return total;
  }

  int64_t cached_positions() const override { return std::accumulate(lengths_.begin(), lengths_.end(), int64_t(0)); }

  absl::Status FillCacheWithNoise(int context) override {
    if (context > capacity_) return absl::OutOfRangeError(absl::StrCat("context ", context, " > capacity ", capacity_));
    for (auto& cache : caches_) cache->FillWithNoise(context);
    std::fill(lengths_.begin(), lengths_.end(), context);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> Forward(const StepRows& rows, LogitRows which) override {
    KVPLAN_RETURN_IF_ERROR(ValidateStepRows(rows, config_, lengths_, capacity_));
    const int T = int(rows.tokens.size());
    std::vector<bool> wanted(T);
    for (int t = 0; t < T; ++t)
      wanted[t] = which == LogitRows::kAll || t + 1 == T || rows.sequences[t + 1] != rows.sequences[t];
    const std::vector<int> chunks = ChunkRows(rows, options_.chunk_rows);
    std::vector<float> logits;
    for (size_t c = 0; c + 1 < chunks.size(); ++c) ForwardRows(rows, chunks[c], chunks[c + 1], wanted, logits);
    for (int t = 0; t < T; ++t) lengths_[rows.sequences[t]] = rows.positions[t] + 1;
    return logits;
  }

 private:
  // Runs rows [begin, end) and appends the logits of the wanted ones.
  void ForwardRows(const StepRows& all_rows, int begin, int end, const std::vector<bool>& wanted,
                   std::vector<float>& logits) {
    const ModelConfig& c = config_;
    const int T = end - begin;
    const int32_t* tokens = all_rows.tokens.data() + begin;
    const int32_t* sequences = all_rows.sequences.data() + begin;
    const int32_t* positions = all_rows.positions.data() + begin;
    const int hidden = c.hidden_size, q_dim = c.q_dim(), kv_dim = c.kv_dim(), ffn = c.intermediate_size;
    const int qkv_dim = q_dim + 2 * kv_dim;
    std::vector<float> x(int64_t(T) * hidden), normed(x.size()), qkv(int64_t(T) * qkv_dim);
    std::vector<float> q(int64_t(T) * q_dim), k(int64_t(T) * kv_dim), k_pre_rope(k.size()), v(k.size());
    std::vector<float> attention_out(int64_t(T) * q_dim), gate_up(int64_t(T) * 2 * ffn), activated(int64_t(T) * ffn);
    for (int t = 0; t < T; ++t)
      std::copy_n(embed_.data() + int64_t(tokens[t]) * hidden, hidden, x.data() + int64_t(t) * hidden);

    const float attention_factor = float(c.rope.attention_factor);
    for (int l = 0; l < c.num_layers; ++l) {
      const CpuLayer& layer = layers_[l];
      LayerCache& cache = *caches_[l];
      const bool computes_kv = cache.computes_kv();
      const int projected = computes_kv ? qkv_dim : q_dim;
      cpu::rms_norm(x.data(), layer.attention_norm.data(), T, hidden, c.rms_norm_eps, normed.data());
      MatMulTransposed(normed.data(), layer.qkv.data(), T, hidden, projected, qkv.data(), false);
      if (!layer.qkv_bias.empty()) cpu::add_row_bias(qkv.data(), layer.qkv_bias.data(), T, projected);
      for (int t = 0; t < T; ++t) {
        const float* row = qkv.data() + int64_t(t) * projected;
        std::copy_n(row, q_dim, q.data() + int64_t(t) * q_dim);
        if (!computes_kv) continue;
        std::copy_n(row + q_dim, kv_dim, k.data() + int64_t(t) * kv_dim);
        std::copy_n(row + q_dim + kv_dim, kv_dim, v.data() + int64_t(t) * kv_dim);
      }
      cpu::apply_rope(q.data(), positions, inv_freq_.data(), T, c.num_heads, c.head_dim, attention_factor);
      if (computes_kv) {
        k_pre_rope = k;
        cpu::apply_rope(k.data(), positions, inv_freq_.data(), T, c.num_kv_heads, c.head_dim, attention_factor);
        if (options_.observer != nullptr && options_.observer->WantsLayerKv())
          options_.observer->OnLayerKv(l, T, q.data(), k.data(), k_pre_rope.data(), v.data());
      }
      // Rows are grouped by sequence; each group appends, then attends.
      for (int group_begin = 0; group_begin < T;) {
        int group_end = group_begin + 1;
        while (group_end < T && sequences[group_end] == sequences[group_begin]) ++group_end;
        const int n = group_end - group_begin;
        if (computes_kv)
          cache.Append(sequences[group_begin], positions + group_begin, n,
                       k_pre_rope.data() + int64_t(group_begin) * kv_dim, k.data() + int64_t(group_begin) * kv_dim,
                       v.data() + int64_t(group_begin) * kv_dim);
        cache.Attend(sequences[group_begin], positions + group_begin, n, q.data() + int64_t(group_begin) * q_dim,
                     attention_out.data() + int64_t(group_begin) * q_dim);
        group_begin = group_end;
      }
      MatMulTransposed(attention_out.data(), layer.o.data(), T, q_dim, hidden, x.data(), true);

      cpu::rms_norm(x.data(), layer.mlp_norm.data(), T, hidden, c.rms_norm_eps, normed.data());
      MatMulTransposed(normed.data(), layer.gate_up.data(), T, hidden, 2 * ffn, gate_up.data(), false);
      cpu::swiglu(gate_up.data(), T, ffn, activated.data());
      MatMulTransposed(activated.data(), layer.down.data(), T, ffn, hidden, x.data(), true);
    }

    if (options_.observer != nullptr) {
      cpu::rms_norm(x.data(), final_norm_.data(), T, hidden, c.rms_norm_eps, normed.data());
      options_.observer->OnFinalHidden(T, normed.data());
    }
    std::vector<int> logit_rows;
    for (int t = 0; t < T; ++t)
      if (wanted[begin + t]) logit_rows.push_back(t);
    if (logit_rows.empty()) return;
    std::vector<float> selected(logit_rows.size() * hidden);
    for (size_t i = 0; i < logit_rows.size(); ++i)
      std::copy_n(x.data() + int64_t(logit_rows[i]) * hidden, hidden, selected.data() + i * hidden);
    cpu::rms_norm(selected.data(), final_norm_.data(), int64_t(logit_rows.size()), hidden, c.rms_norm_eps,
                  selected.data());
    const size_t offset = logits.size();
    logits.resize(offset + logit_rows.size() * c.vocab_size);
    const std::vector<float>& head = c.tie_word_embeddings ? embed_ : lm_head_;
    MatMulTransposed(selected.data(), head.data(), int(logit_rows.size()), hidden, c.vocab_size, logits.data() + offset,
                     false);
  }

  // Every layer's cache as the options say, all sequences empty.
  absl::Status BuildCaches() {
    const int max_step_rows = options_.chunk_rows > 0 ? std::min(options_.chunk_rows, capacity_) : capacity_;
    caches_ = options_.cache_factory ? options_.cache_factory(config_, options_.num_sequences, capacity_, max_step_rows)
                                     : std::vector<std::unique_ptr<LayerCache>>();
    if (caches_.empty())
      for (int l = 0; l < config_.num_layers; ++l)
        caches_.push_back(CreateDenseLayerCache(config_, options_.num_sequences, capacity_));
    if (int(caches_.size()) != config_.num_layers)
      return absl::InternalError("cache factory built the wrong number of layer caches");
    lengths_.assign(options_.num_sequences, 0);
    return absl::OkStatus();
  }

  ModelConfig config_;
  CpuModelOptions options_;
  int capacity_;
  std::vector<float> inv_freq_;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<CpuLayer> layers_;
  std::vector<std::unique_ptr<LayerCache>> caches_;
  std::vector<int32_t> lengths_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                      const CpuModelOptions& options) {
  if (options.num_sequences <= 0) return absl::InvalidArgumentError("num_sequences must be positive");
  // The runtime parallelises over rows and heads with OpenMP; a second (OpenBLAS) thread pool spinning beside it
  // made plan evaluations 1.75x slower on 2 cores, so BLAS runs single-threaded inside each OpenMP worker.
  openblas_set_num_threads(1);
  auto model = std::make_unique<CpuModel>(config, options);
  KVPLAN_RETURN_IF_ERROR(model->Load(weights));
  return model;
}

absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             const plan::Plan& plan, CpuModelOptions options) {
  KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(plan, config, weights));
  return CreatePlannedCpuModel(config, weights, std::make_shared<const PlanPolicies>(std::move(policies)), options);
}

absl::StatusOr<std::unique_ptr<Model>> CreatePlannedCpuModel(const ModelConfig& config, const WeightSource& weights,
                                                             std::shared_ptr<const PlanPolicies> policies,
                                                             CpuModelOptions options) {
  KVPLAN_ASSIGN_OR_RETURN(auto model, CreateCpuModel(config, weights, options));
  KVPLAN_RETURN_IF_ERROR(model->UsePolicies(std::move(policies)));
  return model;
}

}  // namespace kvplan
