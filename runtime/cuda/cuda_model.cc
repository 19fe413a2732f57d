#include "runtime/cuda/cuda_model.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <map>
#include <numeric>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cuda/kernels.h"
#include "plans/cache_policy.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/cuda/cuda_cache.h"
#include "runtime/cuda/device_memory.h"

namespace kvplan {
namespace {

CachePolicy FullCachePolicy(const ModelConfig& config) {
  return CachePolicy{.num_kv_heads = config.num_kv_heads,
                     .head_dim = config.head_dim,
                     .layers = std::vector<LayerPolicy>(config.num_layers)};
}

// An instantiated CUDA graph, destroyed with its owner.
class GraphExec {
 public:
  explicit GraphExec(cudaGraphExec_t exec) : exec_(exec) {}
  GraphExec(GraphExec&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
  }
  cudaGraphExec_t get() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
};

// cuBLAS's recommended workspace on Hopper: set explicitly, so GEMMs captured into a graph allocate nothing.
constexpr size_t kCublasWorkspaceBytes = 32 << 20;

struct CudaLayer {
  DeviceBuffer attention_norm, q, k, v, o, mlp_norm, down;  // bf16
  DeviceBuffer gate_up;                 // bf16 [2 ffn, hidden]: gate then up, so one GEMM makes both
  DeviceBuffer q_bias, k_bias, v_bias;  // fp32, only with attention_bias
};

class CudaModel : public Model {
 public:
  CudaModel(const ModelConfig& config, const CudaModelOptions& options)
      : config_(config),
        num_sequences_(options.num_sequences),
        capacity_(options.capacity > 0 ? options.capacity : int(config.max_position_embeddings)),
        max_rows_(options.max_rows),
        use_graphs_(options.cuda_graphs && options.observer == nullptr),  // observing synchronises
        policy_(options.policy ? *options.policy : FullCachePolicy(config)),
        codebook_(options.codebooks),
        observer_(options.observer) {}

  ~CudaModel() override {
    graphs_.clear();
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
    KVPLAN_RETURN_IF_ERROR(cublas_workspace_.Allocate(kCublasWorkspaceBytes));
    KVPLAN_RETURN_IF_ERROR(CublasStatus(
        cublasSetWorkspace(cublas_, cublas_workspace_.as<void>(), kCublasWorkspaceBytes), "cublasSetWorkspace"));

    KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, {EmbeddingSpec(c)}, embed_));
    KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, {FinalNormSpec(c)}, final_norm_));
    if (!c.tie_word_embeddings) KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, {LmHeadSpec(c)}, lm_head_));
    layers_.resize(c.num_layers);
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerSpecs specs = LayerTensorSpecs(c, l);
      CudaLayer& layer = layers_[l];
      std::vector<std::pair<const TensorSpec*, DeviceBuffer*>> matrices = {
          {&specs.attention_norm, &layer.attention_norm},
          {&specs.q, &layer.q},
          {&specs.o, &layer.o},
          {&specs.mlp_norm, &layer.mlp_norm},
          {&specs.down, &layer.down}};
      std::vector<std::pair<const TensorSpec*, DeviceBuffer*>> biases;
      if (c.attention_bias) biases.push_back({&specs.q_bias, &layer.q_bias});
      // A sharing layer never projects K or V: its K/V weights stay on the host.
      if (!policy_.layers[l].shares()) {
        matrices.insert(matrices.end(), {{&specs.k, &layer.k}, {&specs.v, &layer.v}});
        if (c.attention_bias)
          biases.insert(biases.end(), {{&specs.k_bias, &layer.k_bias}, {&specs.v_bias, &layer.v_bias}});
      }
      for (auto [spec, buffer] : matrices) KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, {*spec}, *buffer));
      KVPLAN_RETURN_IF_ERROR(UploadBf16(weights, {specs.gate, specs.up}, layer.gate_up));
      for (auto [spec, buffer] : biases) KVPLAN_RETURN_IF_ERROR(UploadFloat(weights, *spec, *buffer));
    }
    if (observer_ != nullptr) {
      KVPLAN_ASSIGN_OR_RETURN(final_norm_host_, weights.Read(FinalNormSpec(c)));
    }
    const std::vector<float> inv_freq = RopeInverseFrequencies(c);
    KVPLAN_RETURN_IF_ERROR(UploadHost(inv_freq.data(), inv_freq.size() * sizeof(float), inv_freq_));

    return Batch(num_sequences_, max_rows_);
  }

  // Sizes everything that depends on the batch (activations, logits, the KV cache) for `num_sequences` sequences
  // and passes of up to `max_rows` rows; every sequence starts empty. The weights stay.
  absl::Status Batch(int num_sequences, int max_rows) {
    const ModelConfig& c = config_;
    graphs_.clear();
    cache_.reset();  // its device memory goes back before the new buffers are taken
    num_sequences_ = num_sequences;
    max_rows_ = max_rows;
    const size_t rows = max_rows_, hidden = c.hidden_size, ffn = c.intermediate_size;
    for (auto [buffer, bytes] : {std::pair{&x_, rows * hidden * 4},
                                 {&normed_, rows * hidden * 2},
                                 {&q_, rows * c.q_dim() * 4},
                                 {&k_, rows * c.kv_dim() * 4},
                                 {&v_, rows * c.kv_dim() * 4},
                                 {&attention_out_, rows * c.q_dim() * 2},
                                 {&gate_up_, rows * 2 * ffn * 4},
                                 {&activated_, rows * ffn * 2}}) {
      KVPLAN_RETURN_IF_ERROR(buffer->Allocate(bytes));
    }
    KVPLAN_RETURN_IF_ERROR(logits_.Allocate(0));
    if (observer_ != nullptr) {
      KVPLAN_RETURN_IF_ERROR(k_roped_.Allocate(rows * c.kv_dim() * 4));
      KVPLAN_RETURN_IF_ERROR(observed_.Allocate(rows * std::max<size_t>(c.q_dim() + 3 * c.kv_dim(), hidden) * 4));
    }
    return BuildCache();
  }

  // The KV cache of the policy for the batch and pass size; every sequence starts empty.
  absl::Status BuildCache() {
    graphs_.clear();  // they captured the old cache's buffers
    cache_.reset();
    KVPLAN_ASSIGN_OR_RETURN(
        cache_,
        CreateCudaKvCache(config_, policy_, codebook_,
                          {.num_sequences = num_sequences_, .capacity = capacity_, .max_rows = max_rows_}, stream_));
    lengths_.assign(num_sequences_, 0);
    return absl::OkStatus();
  }

  absl::Status UsePolicies(std::shared_ptr<const PlanPolicies> policies) override {
    CachePolicy policy = policies ? policies->cache : FullCachePolicy(config_);
    KVPLAN_RETURN_IF_ERROR(CudaSupports(policy, config_));
    for (int l = 0; l < config_.num_layers; ++l)
      if (!policy.layers[l].shares() && layers_[l].k.bytes() == 0)
        return absl::FailedPreconditionError(
            absl::StrCat("layer ", l,
                         "'s K/V weights were left on the host (the model was made with a plan that "
                         "shares the layer); make the model without a plan to switch plans"));
    policy_ = std::move(policy);
    codebook_ = policies ? policies->codebooks : std::vector<std::shared_ptr<const LayerCodebook>>();
    return BuildCache();  // activations depend on the batch alone, and stay
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
  void Reset() override {
    std::fill(lengths_.begin(), lengths_.end(), 0);
    reset_status_ = cache_->Reset();
  }
  absl::Status ResetSequence(int sequence) override {
    KVPLAN_RETURN_IF_ERROR(CheckSequence(sequence, num_sequences_));
    lengths_[sequence] = 0;
    return cache_->ResetSequence(sequence);
  }
  int64_t kv_cache_bytes() const override {
    int64_t bytes = 0;
    for (int32_t length : lengths_) bytes += CacheBytes(policy_, length);
    return bytes;
  }

  int64_t weight_bytes() const override { return weight_bytes_; }

  int64_t cached_positions() const override { return std::accumulate(lengths_.begin(), lengths_.end(), int64_t(0)); }

  absl::Status FillCacheWithNoise(int context) override {
    KVPLAN_RETURN_IF_ERROR(cache_->FillWithNoise(context));
    std::fill(lengths_.begin(), lengths_.end(), context);
    return absl::OkStatus();
  }

  const CudaKvCache& cache() const { return *cache_; }

  absl::StatusOr<std::vector<float>> Forward(const StepRows& rows, LogitRows which) override {
    const ModelConfig& c = config_;
    const int T = int(rows.tokens.size());
    if (T > max_rows_)
      return absl::InvalidArgumentError(absl::StrCat(T, " rows exceed the CUDA runtime's max_rows ", max_rows_));
    KVPLAN_RETURN_IF_ERROR(ValidateStepRows(rows, config_, lengths_, capacity_));
    KVPLAN_RETURN_IF_ERROR(std::exchange(reset_status_, absl::OkStatus()));
    std::vector<bool> wanted(T);
    int wanted_rows = 0;
    for (int t = 0; t < T; ++t) {
      wanted[t] = which == LogitRows::kAll || t + 1 == T || rows.sequences[t + 1] != rows.sequences[t];
      wanted_rows += wanted[t];
    }
    const size_t logits_bytes = size_t(wanted_rows) * c.vocab_size * sizeof(float);
    KVPLAN_RETURN_IF_ERROR(ReserveLogits(logits_bytes));
    if (use_graphs_ && OneRowPerSequence(rows)) {
      KVPLAN_RETURN_IF_ERROR(ReplayDecodeGraph(rows));
    } else {
      const std::vector<int> passes = ChunkRows(rows, cache_->max_rows_per_sequence());
      int logit_rows = 0;
      for (size_t p = 0; p + 1 < passes.size(); ++p) {
        KVPLAN_RETURN_IF_ERROR(cache_->BeginPass(rows, passes[p], passes[p + 1]));
        KVPLAN_RETURN_IF_ERROR(EnqueuePass(passes[p], passes[p + 1], wanted, logit_rows));
      }
      KVPLAN_CUDA(cudaMemcpyAsync(logits_host_.as<float>(), logits_.as<float>(), logits_bytes, cudaMemcpyDeviceToHost,
                                  stream_));
    }
    KVPLAN_CUDA(cudaStreamSynchronize(stream_));
    for (int t = 0; t < T; ++t) lengths_[rows.sequences[t]] = rows.positions[t] + 1;
    return std::vector<float>(logits_host_.as<float>(), logits_host_.as<float>() + size_t(wanted_rows) * c.vocab_size);
  }

 private:
  static bool OneRowPerSequence(const StepRows& rows) {
    for (size_t t = 1; t < rows.sequences.size(); ++t)
      if (rows.sequences[t] == rows.sequences[t - 1]) return false;
    return true;
  }

  // Device and pinned room for `bytes` of logits. Captured graphs write where the buffers were; new ones drop them.
  absl::Status ReserveLogits(size_t bytes) {
    if (logits_.bytes() >= bytes) return absl::OkStatus();
    graphs_.clear();
    KVPLAN_RETURN_IF_ERROR(logits_.Allocate(bytes));
    return logits_host_.Allocate(bytes);
  }

  // A decode step (one row per sequence) as a CUDA graph: captured the first time a step of this many rows
  // comes, replayed after that with the step's metadata staged where the graph copies it from. Launches and the
  // kernels' host-side arguments depend on nothing but the row count, so the replay is the same work.
  absl::Status ReplayDecodeGraph(const StepRows& rows) {
    const int T = int(rows.tokens.size());
    KVPLAN_RETURN_IF_ERROR(cache_->StageGraphPass(rows));
    auto found = graphs_.find(T);
    if (found == graphs_.end()) {
      KVPLAN_ASSIGN_OR_RETURN(GraphExec exec, CaptureDecode(T));
      found = graphs_.emplace(T, std::move(exec)).first;
    }
    return CudaStatus(cudaGraphLaunch(found->second.get(), stream_), "cudaGraphLaunch");
  }

  absl::StatusOr<GraphExec> CaptureDecode(int T) {
    KVPLAN_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    const std::vector<bool> wanted(T, true);
    int logit_rows = 0;
    absl::Status status = cache_->UploadGraphPass();
    if (status.ok()) status = EnqueuePass(0, T, wanted, logit_rows);
    if (status.ok())
      status =
          CudaStatus(cudaMemcpyAsync(logits_host_.as<float>(), logits_.as<float>(),
                                     size_t(T) * config_.vocab_size * sizeof(float), cudaMemcpyDeviceToHost, stream_),
                     "logits copy");
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    KVPLAN_RETURN_IF_ERROR(status);
    KVPLAN_CUDA(ended);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    KVPLAN_CUDA(instantiated);
    return GraphExec(exec);
  }

  // Rows [begin, end) of the pass the cache last began through every layer; the wanted rows' logits land after
  // the `logit_rows` already written.
  absl::Status EnqueuePass(int begin, int end, const std::vector<bool>& wanted, int& logit_rows) {
    const ModelConfig& c = config_;
    const int T = end - begin;
    const int hidden = c.hidden_size, ffn = c.intermediate_size;
    KVPLAN_CUDA(cuda::embed_tokens(embed_.as<__nv_bfloat16>(), cache_->tokens(), T, hidden, x_.as<float>(), stream_));
    for (int l = 0; l < c.num_layers; ++l) {
      const CudaLayer& layer = layers_[l];
      KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), layer.attention_norm.as<__nv_bfloat16>(), T, hidden, c.rms_norm_eps,
                                 normed_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.q, T, hidden, c.q_dim(), q_, 0.0f));
      if (c.attention_bias)
        KVPLAN_CUDA(cuda::add_row_bias(q_.as<float>(), layer.q_bias.as<float>(), T, c.q_dim(), stream_));
      KVPLAN_CUDA(cuda::apply_rope(q_.as<float>(), cache_->row_position(), inv_freq_.as<float>(), T, c.num_heads,
                                   c.head_dim, float(c.rope.attention_factor), stream_));
      // A sharing layer attends over its donor's cache, which the donor already extended this pass.
      if (!policy_.layers[l].shares()) {
        KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.k, T, hidden, c.kv_dim(), k_, 0.0f));
        KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.v, T, hidden, c.kv_dim(), v_, 0.0f));
        if (c.attention_bias) {
          KVPLAN_CUDA(cuda::add_row_bias(k_.as<float>(), layer.k_bias.as<float>(), T, c.kv_dim(), stream_));
          KVPLAN_CUDA(cuda::add_row_bias(v_.as<float>(), layer.v_bias.as<float>(), T, c.kv_dim(), stream_));
        }
      }
      if (observer_ != nullptr && observer_->WantsLayerKv() && !policy_.layers[l].shares())
        KVPLAN_RETURN_IF_ERROR(ObserveLayer(l, T));
      KVPLAN_RETURN_IF_ERROR(
          cache_->Layer(l, q_.as<float>(), k_.as<float>(), v_.as<float>(), attention_out_.as<__nv_bfloat16>()));
      KVPLAN_RETURN_IF_ERROR(Gemm(attention_out_, layer.o, T, c.q_dim(), hidden, x_, 1.0f));
      KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), layer.mlp_norm.as<__nv_bfloat16>(), T, hidden, c.rms_norm_eps,
                                 normed_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(normed_, layer.gate_up, T, hidden, 2 * ffn, gate_up_, 0.0f));
      KVPLAN_CUDA(cuda::swiglu(gate_up_.as<float>(), T, ffn, activated_.as<__nv_bfloat16>(), stream_));
      KVPLAN_RETURN_IF_ERROR(Gemm(activated_, layer.down, T, ffn, hidden, x_, 1.0f));
    }

    if (observer_ != nullptr) KVPLAN_RETURN_IF_ERROR(ObserveFinalHidden(T));
    // Gather the rows whose logits are wanted to the front of x_, then norm and project only those.
    int selected = 0;
    for (int t = 0; t < T; ++t) {
      if (!wanted[begin + t]) continue;
      if (t != selected)
        KVPLAN_CUDA(cudaMemcpyAsync(x_.as<float>() + int64_t(selected) * hidden, x_.as<float>() + int64_t(t) * hidden,
                                    hidden * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
      ++selected;
    }
    if (selected == 0) return absl::OkStatus();
    KVPLAN_CUDA(cuda::rms_norm(x_.as<float>(), final_norm_.as<__nv_bfloat16>(), selected, hidden, c.rms_norm_eps,
                               normed_.as<__nv_bfloat16>(), stream_));
    const float alpha = 1.0f, beta = 0.0f;
    const DeviceBuffer& head = c.tie_word_embeddings ? embed_ : lm_head_;
    float* logits = logits_.as<float>() + int64_t(logit_rows) * c.vocab_size;
    KVPLAN_RETURN_IF_ERROR(
        CublasStatus(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, c.vocab_size, selected, hidden, &alpha,
                                  head.as<void>(), CUDA_R_16BF, hidden, normed_.as<void>(), CUDA_R_16BF, hidden, &beta,
                                  logits, CUDA_R_32F, c.vocab_size, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx"));
    logit_rows += selected;
    return absl::OkStatus();
  }

  // Shows the observer layer l's queries (after RoPE), keys after and before RoPE and values of the pass's T rows:
  // in device memory, or copied to the host if it does not take them there.
  absl::Status ObserveLayer(int l, int T) {
    const ModelConfig& c = config_;
    const size_t q_values = size_t(T) * c.q_dim(), kv_values = size_t(T) * c.kv_dim();
    KVPLAN_CUDA(cudaMemcpyAsync(k_roped_.as<float>(), k_.as<float>(), kv_values * sizeof(float),
                                cudaMemcpyDeviceToDevice, stream_));
    KVPLAN_CUDA(cuda::apply_rope(k_roped_.as<float>(), cache_->row_position(), inv_freq_.as<float>(), T, c.num_kv_heads,
                                 c.head_dim, float(c.rope.attention_factor), stream_));
    if (observer_->OnDeviceLayerKv(l, T, q_.as<float>(), k_roped_.as<float>(), k_.as<float>(), v_.as<float>(), stream_))
      return absl::OkStatus();
    float* q = observed_.as<float>();
    float* k = q + q_values;
    float* k_pre_rope = k + kv_values;
    float* v = k_pre_rope + kv_values;
    for (auto [host, device, values] :
         {std::tuple{q, &q_, q_values}, {k, &k_roped_, kv_values}, {k_pre_rope, &k_, kv_values}, {v, &v_, kv_values}})
      KVPLAN_CUDA(cudaMemcpyAsync(host, device->as<float>(), values * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    KVPLAN_CUDA(cudaStreamSynchronize(stream_));
    observer_->OnLayerKv(l, T, q, k, k_pre_rope, v);
    return absl::OkStatus();
  }

  // Shows the observer the pass's final hidden states, normed on the host in fp32 as the CPU runtime does.
  absl::Status ObserveFinalHidden(int T) {
    const int hidden = config_.hidden_size;
    KVPLAN_CUDA(cudaMemcpyAsync(observed_.as<float>(), x_.as<float>(), size_t(T) * hidden * sizeof(float),
                                cudaMemcpyDeviceToHost, stream_));
    KVPLAN_CUDA(cudaStreamSynchronize(stream_));
    std::vector<float> normed(size_t(T) * hidden);
    cpu::rms_norm(observed_.as<float>(), final_norm_host_.data(), T, hidden, config_.rms_norm_eps, normed.data());
    observer_->OnFinalHidden(T, normed.data());
    return absl::OkStatus();
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

  // The tensors, stacked in order (rows of one after the other's), as one bf16 buffer.
  absl::Status UploadBf16(const WeightSource& weights, const std::vector<TensorSpec>& specs, DeviceBuffer& buffer) {
    std::vector<uint16_t> bf16;
    for (const TensorSpec& spec : specs) {
      KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> values, weights.Read(spec));
      const size_t offset = bf16.size();
      bf16.resize(offset + values.size());
#pragma omp parallel for
      for (int64_t i = 0; i < int64_t(values.size()); ++i) bf16[offset + i] = FloatToBf16(values[i]);
    }
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
  bool use_graphs_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  DeviceBuffer cublas_workspace_;
  DeviceBuffer embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<CudaLayer> layers_;
  DeviceBuffer x_, normed_, q_, k_, v_, attention_out_, gate_up_, activated_, logits_;
  PinnedBuffer logits_host_;
  std::map<int, GraphExec> graphs_;  // decode graphs by row count
  int64_t weight_bytes_ = 0;         // what the uploads took on the device
  CachePolicy policy_;
  std::vector<std::shared_ptr<const LayerCodebook>> codebook_;
  std::unique_ptr<CudaKvCache> cache_;
  std::vector<int32_t> lengths_;
  ForwardObserver* observer_;
  DeviceBuffer k_roped_;   // with an observer: keys after RoPE (the cache holds them only in bf16)
  PinnedBuffer observed_;  // with an observer: what it is shown
  std::vector<float> final_norm_host_;
  absl::Status reset_status_;  // a failed Reset, reported by the next Forward
};

}  // namespace

absl::Status CudaSupports(const CachePolicy& policy, const ModelConfig& config) {
  for (int l = 0; l < int(policy.layers.size()); ++l) {
    if (!policy.layers[l].stores_compressed()) continue;
    if (!cuda::compressed_attention_supported(config.num_heads, config.num_kv_heads, config.head_dim))
      return absl::UnimplementedError(absl::StrCat(
          "the CUDA runtime executes compressed caches for head_dim 64/128/256 with at most 8 query heads per KV "
          "head; this model has head_dim ",
          config.head_dim, " and ", config.num_heads / std::max(1, config.num_kv_heads), " (layer ", l,
          "). Run this plan with --device cpu"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> BatchToFit(Model& model, int64_t device_bytes) {
  auto* cuda_model = dynamic_cast<CudaModel*>(&model);
  if (cuda_model == nullptr) return absl::InvalidArgumentError("not a CUDA runtime model");
  auto used_at = [&](int batch) -> absl::StatusOr<int64_t> {
    KVPLAN_RETURN_IF_ERROR(cuda_model->Batch(batch, batch));
    size_t free = 0, total = 0;
    KVPLAN_CUDA(cudaMemGetInfo(&free, &total));
    return int64_t(total - free);
  };
  // Memory grows with the batch by the cache and activations of one sequence (and a little scratch that grows
  // faster), so extrapolate from two small batches, then step down until the measurement fits.
  KVPLAN_ASSIGN_OR_RETURN(const int64_t used_1, used_at(1));
  KVPLAN_ASSIGN_OR_RETURN(const int64_t used_9, used_at(9));
  const double per_sequence = double(used_9 - used_1) / 8;
  if (used_1 > device_bytes) return absl::ResourceExhaustedError("one sequence does not fit the memory budget");
  int batch = std::max(1, int(double(device_bytes - used_1) / per_sequence) + 1);
  while (batch > 1) {
    const absl::StatusOr<int64_t> used = used_at(batch);
    if (used.ok() && *used <= device_bytes) return batch;
    batch = std::max(1, std::min(batch - 1, int(batch * 0.97)));
  }
  KVPLAN_RETURN_IF_ERROR(used_at(1).status());
  return 1;
}

absl::StatusOr<std::vector<HeadEntries>> ReadCudaHeadEntries(const Model& model, int layer) {
  const auto* cuda_model = dynamic_cast<const CudaModel*>(&model);
  if (cuda_model == nullptr) return absl::InvalidArgumentError("not a CUDA runtime model");
  return cuda_model->cache().ReadHeadEntries(layer);
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
    KVPLAN_RETURN_IF_ERROR(CudaSupports(*options.policy, config));
  }
  auto model = std::make_unique<CudaModel>(config, options);
  KVPLAN_RETURN_IF_ERROR(model->Load(weights));
  return model;
}

}  // namespace kvplan
