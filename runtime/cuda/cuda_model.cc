#include "runtime/cuda/cuda_model.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/kernels.h"
#include "plans/cache_policy.h"

namespace kvplan {
namespace {

absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorString(error)));
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS error in ", what, ": ", cublasGetStatusString(status)));
}

#define KVPLAN_CUDA(call) KVPLAN_RETURN_IF_ERROR(CudaStatus((call), #call))

CachePolicy FullCachePolicy(const ModelConfig& config) {
  return CachePolicy{.num_kv_heads = config.num_kv_heads,
                     .head_dim = config.head_dim,
                     .layers = std::vector<LayerPolicy>(config.num_layers)};
}

// An owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) { other.data_ = nullptr; }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  absl::Status Allocate(size_t bytes) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    bytes_ = bytes;
    return CudaStatus(cudaMalloc(&data_, std::max<size_t>(bytes, 1)), "cudaMalloc");
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

struct CudaLayer {
  DeviceBuffer attention_norm, q, k, v, o, mlp_norm, gate, up, down;  // bf16
  DeviceBuffer q_bias, k_bias, v_bias;                                // fp32, only with attention_bias
};

class CudaModel : public Model {
 public:
  CudaModel(const ModelConfig& config, const CudaModelOptions& options)
      : config_(config),
        num_sequences_(options.num_sequences),
        capacity_(options.capacity > 0 ? options.capacity : int(config.max_position_embeddings)),
        max_rows_(options.max_rows),
        policy_(options.policy ? *options.policy : FullCachePolicy(config)) {
    // A sharing layer reads its donor's cache slot; every other layer owns one.
    int slots = 0;
    for (const LayerPolicy& layer : policy_.layers) cache_slot_.push_back(layer.shares() ? -1 : slots++);
    for (int l = 0; l < config.num_layers; ++l)
      if (policy_.layers[l].shares()) cache_slot_[l] = cache_slot_[policy_.layers[l].donor];
    cache_slots_ = slots;
  }

  ~CudaModel() override {
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Load(const WeightSource& weights) {
    const ModelConfig& c = config_;
    if (!cuda::attention_supported(c.num_heads, c.num_kv_heads, c.head_dim))
      return absl::UnimplementedError(
          absl::StrCat("CUDA attention supports head_dim 32/64/128/256 and at most 8 query "
                       "heads per KV head; model has head_dim ",
                       c.head_dim, ", ", c.num_heads / c.num_kv_heads, " per KV head"));
    KVPLAN_CUDA(cudaStreamCreate(&stream_));
    KVPLAN_RETURN_IF_ERROR(CublasStatus(cublasCreate(&cublas_), "cublasCreate"));
    KVPLAN_RETURN_IF_ERROR(CublasStatus(cublasSetStream(cublas_, stream_), "cublasSetStream"));

    KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, EmbeddingSpec(c), embed_));
    KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, FinalNormSpec(c), final_norm_));
    if (!c.tie_word_embeddings) KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, LmHeadSpec(c), lm_head_));
    layers_.resize(c.num_layers);
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerSpecs specs = LayerTensorSpecs(c, l);
      CudaLayer& layer = layers_[l];
      std::vector<std::pair<const TensorSpec*, DeviceBuffer*>> matrices = {
          {&specs.attention_norm, &layer.attention_norm},
          {&specs.q, &layer.q},
          {&specs.o, &layer.o},
          {&specs.mlp_norm, &layer.mlp_norm},
          {&specs.gate, &layer.gate},
          {&specs.up, &layer.up},
          {&specs.down, &layer.down}};
      std::vector<std::pair<const TensorSpec*, DeviceBuffer*>> biases;
      if (c.attention_bias) biases.push_back({&specs.q_bias, &layer.q_bias});
      // A sharing layer never projects K or V: its K/V weights stay on the host.
      if (!policy_.layers[l].shares()) {
        matrices.insert(matrices.end(), {{&specs.k, &layer.k}, {&specs.v, &layer.v}});
        if (c.attention_bias)
          biases.insert(biases.end(), {{&specs.k_bias, &layer.k_bias}, {&specs.v_bias, &layer.v_bias}});
      }
      for (auto [spec, buffer] : matrices) KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, *spec, *buffer));
      for (auto [spec, buffer] : biases) KVPLAN_RETURN_IF_ERROR(UploadFloat(weights, *spec, *buffer));
    }
    const std::vector<float> inv_freq = RopeInverseFrequencies(c);
    KVPLAN_RETURN_IF_ERROR(UploadHost(inv_freq.data(), inv_freq.size() * sizeof(float), inv_freq_));

    const size_t rows = max_rows_, hidden = c.hidden_size, ffn = c.intermediate_size;
    for (auto [buffer, bytes] : {std::pair{&x_, rows * hidden * 4},
                                 {&normed_, rows * hidden * 2},
                                 {&q_, rows * c.q_dim() * 4},
                                 {&k_, rows * c.kv_dim() * 4},
                                 {&v_, rows * c.kv_dim() * 4},
                                 {&attention_out_, rows * c.q_dim() * 2},
                                 {&gate_, rows * ffn * 4},
                                 {&up_, rows * ffn * 4},
                                 {&activated_, rows * ffn * 2},
                                 {&tokens_, rows * 4},
                                 {&sequences_, rows * 4},
                                 {&positions_, rows * 4}}) {
      KVPLAN_RETURN_IF_ERROR(buffer->Allocate(bytes));
    }
    KVPLAN_RETURN_IF_ERROR(
        workspace_.Allocate(cuda::attention_workspace_bytes(max_rows_, c.num_heads, c.head_dim, capacity_)));
    const size_t cache_bytes = size_t(cache_slots_) * LayerCacheElements() * sizeof(__nv_bfloat16);
    KVPLAN_RETURN_IF_ERROR(k_cache_.Allocate(cache_bytes));
    KVPLAN_RETURN_IF_ERROR(v_cache_.Allocate(cache_bytes));
    lengths_.assign(num_sequences_, 0);
    return absl::OkStatus();
  }

  const ModelConfig& config() const override { return config_; }
  int num_sequences() const override { return num_sequences_; }
  int capacity() const override { return capacity_; }
  std::string device_name() const override {
    cudaDeviceProp properties;
    int device = 0;
    cudaGetDevice(&device);
    cudaGetDeviceProperties(&properties, device);
    return properties.name;
  }
  void Reset() override { std::fill(lengths_.begin(), lengths_.end(), 0); }
  int64_t kv_cache_bytes() const override {
    int64_t bytes = 0;
    for (int32_t length : lengths_) bytes += CacheBytes(policy_, length);
    return bytes;
  }

  int64_t weight_bytes() const override { return weight_bytes_; }

  int64_t cached_positions() const override { return std::accumulate(lengths_.begin(), lengths_.end(), int64_t(0)); }

  absl::Status FillCacheWithNoise(int context) override {
    if (context > capacity_) return absl::OutOfRangeError(absl::StrCat("context ", context, " > capacity ", capacity_));
    std::vector<uint16_t> noise(LayerCacheElements());
#pragma omp parallel for
    for (int64_t i = 0; i < int64_t(noise.size()); ++i) {
      const uint64_t z = (uint64_t(i) + 1) * 0x9e3779b97f4a7c15ull;
      noise[i] = FloatToBf16(float(int64_t(z >> 40) % 2001 - 1000) / 1000.0f);
    }
    const size_t layer_bytes = noise.size() * sizeof(uint16_t);
    for (int slot = 0; slot < cache_slots_; ++slot) {
      KVPLAN_CUDA(
          cudaMemcpy(k_cache_.as<char>() + slot * layer_bytes, noise.data(), layer_bytes, cudaMemcpyHostToDevice));
      KVPLAN_CUDA(
          cudaMemcpy(v_cache_.as<char>() + slot * layer_bytes, noise.data(), layer_bytes, cudaMemcpyHostToDevice));
    }
    std::fill(lengths_.begin(), lengths_.end(), context);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> Forward(const StepRows& rows, LogitRows which) override {
    const ModelConfig& c = config_;
    const int T = int(rows.tokens.size());
    if (T > max_rows_)
      return absl::InvalidArgumentError(absl::StrCat(T, " rows exceed the CUDA runtime's max_rows ", max_rows_));
    KVPLAN_RETURN_IF_ERROR(ValidateStepRows(rows, config_, lengths_, capacity_));
    KVPLAN_CUDA(cudaMemcpyAsync(tokens_.as<int32_t>(), rows.tokens.data(), T * 4, cudaMemcpyHostToDevice, stream_));
    KVPLAN_CUDA(
        cudaMemcpyAsync(sequences_.as<int32_t>(), rows.sequences.data(), T * 4, cudaMemcpyHostToDevice, stream_));
    KVPLAN_CUDA(
        cudaMemcpyAsync(positions_.as<int32_t>(), rows.positions.data(), T * 4, cudaMemcpyHostToDevice, stream_));
    const int max_context = *std::max_element(rows.positions.begin(), rows.positions.end()) + 1;
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    const float rope_factor = float(c.rope.attention_factor);
    const int hidden = c.hidden_size, ffn = c.intermediate_size;
    KVPLAN_CUDA(
        cuda::embed_tokens(embed_.as<__nv_bfloat16>(), tokens_.as<int32_t>(), T, hidden, x_.as<float>(), stream_));
    for (int l = 0; l < c.num_layers; ++l) {
      const CudaLayer& layer = layers_[l];
      const bool computes_kv = !policy_.layers[l].shares();
      __nv_bfloat16* k_cache = k_cache_.as<__nv_bfloat16>() + cache_slot_[l] * LayerCacheElements();
      __nv_bfloat16* v_cache = v_cache_.as<__nv_bfloat16>() + cache_slot_[l] * LayerCacheElements();
      KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), layer.attention_norm.as<__nv_bfloat16>(), T, hidden, c.rms_norm_eps,
                                 normed_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.q, T, hidden, c.q_dim(), q_, 0.0f));
      if (c.attention_bias)
        KVPLAN_CUDA(cuda::add_row_bias(q_.as<float>(), layer.q_bias.as<float>(), T, c.q_dim(), stream_));
      KVPLAN_CUDA(cuda::apply_rope(q_.as<float>(), positions_.as<int32_t>(), inv_freq_.as<float>(), T, c.num_heads,
                                   c.head_dim, rope_factor, stream_));
      // A sharing layer attends over its donor's cache, which the donor already extended this step.
      if (computes_kv) {
        KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.k, T, hidden, c.kv_dim(), k_, 0.0f));
        KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.v, T, hidden, c.kv_dim(), v_, 0.0f));
        if (c.attention_bias) {
          KVPLAN_CUDA(cuda::add_row_bias(k_.as<float>(), layer.k_bias.as<float>(), T, c.kv_dim(), stream_));
          KVPLAN_CUDA(cuda::add_row_bias(v_.as<float>(), layer.v_bias.as<float>(), T, c.kv_dim(), stream_));
        }
        KVPLAN_CUDA(cuda::apply_rope(k_.as<float>(), positions_.as<int32_t>(), inv_freq_.as<float>(), T, c.num_kv_heads,
                                     c.head_dim, rope_factor, stream_));
        KVPLAN_CUDA(cuda::append_kv(k_.as<float>(), v_.as<float>(), sequences_.as<int32_t>(), positions_.as<int32_t>(),
                                    T, c.num_kv_heads, c.head_dim, capacity_, k_cache, v_cache, stream_));
      }
      KVPLAN_CUDA(cuda::attention(q_.as<float>(), sequences_.as<int32_t>(), positions_.as<int32_t>(), T, c.num_heads,
                                  c.num_kv_heads, c.head_dim, capacity_, k_cache, v_cache, scale, c.sliding_window,
                                  max_context, workspace_.as<void>(), attention_out_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(attention_out_, layer.o, T, c.q_dim(), hidden, x_, 1.0f));
      KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), layer.mlp_norm.as<__nv_bfloat16>(), T, hidden, c.rms_norm_eps,
                                 normed_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.gate, T, hidden, ffn, gate_, 0.0f));
      KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.up, T, hidden, ffn, up_, 0.0f));
      KVPLAN_CUDA(
          cuda::swiglu(gate_.as<float>(), up_.as<float>(), int64_t(T) * ffn, activated_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(activated_, layer.down, T, ffn, hidden, x_, 1.0f));
    }
    for (int t = 0; t < T; ++t) lengths_[rows.sequences[t]] = rows.positions[t] + 1;

    // Gather the rows whose logits are wanted to the front of x_, then norm and project only those.
    int selected = 0;
    for (int t = 0; t < T; ++t) {
      if (which == LogitRows::kAll || t + 1 == T || rows.sequences[t + 1] != rows.sequences[t]) {
        if (t != selected)
          KVPLAN_CUDA(cudaMemcpyAsync(x_.as<float>() + int64_t(selected) * hidden, x_.as<float>() + int64_t(t) * hidden,
                                      hidden * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
        ++selected;
      }
    }
    KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), final_norm_.as<__nv_bfloat16>(), selected, hidden, c.rms_norm_eps,
                               normed_.as<__nv_bfloat16>(), stream_));
    const size_t logits_bytes = size_t(selected) * c.vocab_size * sizeof(float);
    if (logits_.bytes() < logits_bytes) KVPLAN_RETURN_IF_ERROR(logits_.Allocate(logits_bytes));
    KVPLAN_RETURN_IF_ERROR(
        Gemm(normed_, c.tie_word_embeddings ? embed_ : lm_head_, selected, hidden, c.vocab_size, logits_, 0.0f));
    std::vector<float> logits(size_t(selected) * c.vocab_size);
    KVPLAN_CUDA(cudaMemcpyAsync(logits.data(), logits_.as<float>(), logits_bytes, cudaMemcpyDeviceToHost, stream_));
    KVPLAN_CUDA(cudaStreamSynchronize(stream_));
    return logits;
  }

 private:
  int64_t LayerCacheElements() const {
    return int64_t(num_sequences_) * config_.num_kv_heads * capacity_ * config_.head_dim;
  }

  // y[rows, out] = x[rows, in] * w[out, in]^T + beta * y; x, w bf16; y fp32.
  absl::Status Gemm(const DeviceBuffer& x, const DeviceBuffer& w, int rows, int in, int out, DeviceBuffer& y,
                    float beta) {
    const float alpha = 1.0f;
    return CublasStatus(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w.as<void>(),
                                     CUDA_R_16BF, in, x.as<void>(), CUDA_R_16BF, in, &beta, y.as<void>(), CUDA_R_32F,
                                     out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                        "cublasGemmEx");
  }

  absl::Status UploadHost(const void* data, size_t bytes, DeviceBuffer& buffer) {
    KVPLAN_RETURN_IF_ERROR(buffer.Allocate(bytes));
    return CudaStatus(cudaMemcpy(buffer.as<void>(), data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  }

  absl::Status UploadBf16(const WeightSource& weights, const TensorSpec& spec, DeviceBuffer& buffer) {
    KVPLAN_ASSIGN_OR_RETURN(std::vector<float> values, weights.Read(spec));
    std::vector<uint16_t> bf16(values.size());
#pragma omp parallel for
    for (int64_t i = 0; i < int64_t(bf16.size()); ++i) bf16[i] = FloatToBf16((values)[i]);
    weight_bytes_ += int64_t(bf16.size() * sizeof(uint16_t));
    return UploadHost(bf16.data(), bf16.size() * sizeof(uint16_t), buffer);
  }

  absl::Status UploadFloat(const WeightSource& weights, const TensorSpec& spec, DeviceBuffer& buffer) {
    KVPLAN_ASSIGN_OR_RETURN(std::vector<float> values, weights.Read(spec));
    weight_bytes_ += int64_t(values.size() * sizeof(float));
    return UploadHost(values.data(), values.size() * sizeof(float), buffer);
  }

  ModelConfig config_;
  int num_sequences_, capacity_, max_rows_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<CudaLayer> layers_;
  DeviceBuffer x_, normed_, q_, k_, v_, attention_out_, gate_, up_, activated_, logits_;
  DeviceBuffer tokens_, sequences_, positions_, workspace_;
  int64_t weight_bytes_ = 0;  // what the uploads took on the device
  CachePolicy policy_;
  std::vector<int> cache_slot_;  // [layer]: which slot of k_cache_/v_cache_ the layer attends over
  int cache_slots_ = 0;
  DeviceBuffer k_cache_, v_cache_;  // [slot, sequence, kv_head, capacity, head_dim] bf16
  std::vector<int32_t> lengths_;
};

}  // namespace

absl::Status CudaSupports(const CachePolicy& policy) {
  for (int l = 0; l < int(policy.layers.size()); ++l) {
    const LayerPolicy& layer = policy.layers[l];
    const char* missing = layer.coding    ? "CSR sparse coding"
                          : layer.budget  ? "token budgets"
                          : layer.refresh ? "RefreshKV"
                                          : nullptr;
    if (missing != nullptr)
      return absl::UnimplementedError(absl::StrCat("the CUDA runtime does not execute ", missing, " yet (layer ", l,
                                                   "); it executes layer sharing. Run this plan with --device cpu"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> CreateCudaModel(const ModelConfig& config, const WeightSource& weights,
                                                       const CudaModelOptions& options) {
  if (!cuda::device_available()) return absl::FailedPreconditionError("no CUDA device is available");
  if (options.num_sequences <= 0 || options.max_rows <= 0)
    return absl::InvalidArgumentError("num_sequences and max_rows must be positive");
  if (options.policy) {
    if (int(options.policy->layers.size()) != config.num_layers)
      return absl::InvalidArgumentError(
          absl::StrCat("cache policy for ", options.policy->layers.size(), " layers, model has ", config.num_layers));
    KVPLAN_RETURN_IF_ERROR(CudaSupports(*options.policy));
  }
  auto model = std::make_unique<CudaModel>(config, options);
  KVPLAN_RETURN_IF_ERROR(model->Load(weights));
  return model;
}

}  // namespace kvplan
