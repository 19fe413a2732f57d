#include "runtime/cuda/cuda_cache.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "kernels/cuda/kernels.h"
#include "runtime/cache/compressed_step.h"
#include "runtime/cuda/device_layer.h"
#include "runtime/cuda/device_memory.h"

namespace kvplan {
namespace {

// One compressed layer's device arrays and the views the kernels take of them.
struct DeviceLayer {
  LayerPolicy policy;
  CompressedRegions regions;
  DeviceCompressedLayer arrays;                            // the layout's arrays and the RefreshKV state
  DeviceBuffer key_atoms, value_atoms, key_channel_scale;  // dictionaries, or a quantized layer's key scales
  CompressedLayer view;
  CodingTables tables;
  RefreshStateView refresh;
  int max_region = 0;  // most entries of one head slot, merged slot included

  const CodingTables* tables_or_null() const { return policy.coding ? &tables : nullptr; }
  const RefreshStateView* refresh_or_null() const { return policy.refresh ? &refresh : nullptr; }
};

// Where each array of a pass's metadata sits in the int32 words copied to the device. The offsets depend only on
// the cache's limits, so every pass (and a captured graph) finds them in the same place.
struct PassLayout {
  int64_t tokens = 0, row_sequence = 0, row_position = 0, sequence = 0, row_begin = 0;
  int64_t flash_tiles = 0;              // the tensor-core prefill's row tiles (cuda::flash_tiles)
  std::vector<int64_t> kept, selected;  // [layer]; -1 for layers that do not compress
  int64_t words = 0;
};

// Passes whose metadata copy may still be reading their pinned slot: a new pass takes the oldest slot once its
// copy is done, so the host runs ahead of the device by up to this many passes.
constexpr int kPinnedSlots = 2;

class CudaKvCacheImpl : public CudaKvCache {
 public:
  CudaKvCacheImpl(const ModelConfig& config, const CachePolicy& policy, const CudaCacheOptions& options,
                  cudaStream_t stream)
      : config_(config), policy_(policy), options_(options), stream_(stream) {}

  ~CudaKvCacheImpl() override {
    for (cudaEvent_t event : copied_)
      if (event != nullptr) cudaEventDestroy(event);
  }

  absl::Status Init(const std::vector<std::shared_ptr<const LayerCodebook>>& codebooks) {
    const ModelConfig& c = config_;
    bool compresses = false;
    for (const LayerPolicy& layer : policy_.layers) compresses |= layer.stores_compressed();
    max_rows_per_sequence_ = compresses ? std::min(kPlannedChunkRows, options_.max_rows) : 0;
    // Coding and eviction handle at most one pass's rows of a sequence at a time.
    const int step_rows = max_rows_per_sequence_;
    if (step_rows > cuda::kMaxEvictionsPerStep)
      return absl::InternalError("a pass's rows per sequence exceed what one eviction may remove");
    max_groups_ = std::min(options_.num_sequences, options_.max_rows);

    // Full-cache slots: every layer that keeps the full cache owns one.
    int slots = 0;
    layer_slot_.assign(c.num_layers, -1);
    for (int l = 0; l < c.num_layers; ++l)
      if (policy_.layers[l].keeps_full_cache()) layer_slot_[l] = slots++;
    const size_t slot_bytes = size_t(SlotElements()) * sizeof(__nv_bfloat16);
    KVPLAN_RETURN_IF_ERROR(k_cache_.Allocate(slots * slot_bytes));
    KVPLAN_RETURN_IF_ERROR(v_cache_.Allocate(slots * slot_bytes));
    if (slots > 0 || SharesFullLayer())
      KVPLAN_RETURN_IF_ERROR(dense_workspace_.Allocate(cuda::attention_workspace_bytes(
          options_.max_rows, c.num_heads, c.num_kv_heads, c.head_dim, options_.capacity)));
    KVPLAN_RETURN_IF_ERROR(inv_freq_.Upload(RopeInverseFrequencies(c)));

    compressed_.resize(c.num_layers);
    attention_plans_.resize(c.num_layers);
    device_limits_ = cuda::device_limits();
    int64_t most_dense = 0, most_coded = 0, most_key_sparsity = 0, most_value_sparsity = 0;
    size_t attention_workspace = 0;
    bool refreshes = false, probabilities = false;
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerPolicy& policy = policy_.layers[l];
      if (!policy.stores_compressed()) continue;
      if (policy.coding && (l >= int(codebooks.size()) || codebooks[l] == nullptr))
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " codes but has no codebooks"));
      auto layer = std::make_unique<DeviceLayer>();
      KVPLAN_RETURN_IF_ERROR(AllocateLayer(policy, policy.coding ? codebooks[l].get() : nullptr, *layer));
      most_dense = std::max(most_dense, layer->regions.dense_slots());
      most_coded = std::max(most_coded, layer->regions.coded_slots());
      if (policy.coding) {
        most_key_sparsity = std::max<int64_t>(most_key_sparsity, policy.coding->key_sparsity);
        most_value_sparsity = std::max<int64_t>(most_value_sparsity, policy.coding->value_sparsity);
      }
      attention_workspace = std::max(attention_workspace, cuda::compressed_attention_workspace_bytes(
                                                              AttentionShape(*layer), options_.max_rows, c.num_kv_heads,
                                                              c.head_dim, layer->tables.atoms, device_limits_));
      refreshes |= bool(policy.refresh);
      probabilities |= NeedsProbabilities(policy);
      compressed_[l] = std::move(layer);
    }
    KVPLAN_RETURN_IF_ERROR(compressed_workspace_.Allocate(attention_workspace));
    if (probabilities) {
      KVPLAN_RETURN_IF_ERROR(row_stats_.Allocate(size_t(options_.max_rows) * c.num_heads * 2 * sizeof(float)));
      KVPLAN_RETURN_IF_ERROR(dense_probabilities_.Allocate(most_dense * sizeof(float)));
      KVPLAN_RETURN_IF_ERROR(coded_probabilities_.Allocate(most_coded * sizeof(float)));
    }
    if (refreshes)
      KVPLAN_RETURN_IF_ERROR(position_workspace_.Allocate(
          cuda::refresh_select_workspace_bytes(max_groups_, c.num_kv_heads, options_.capacity)));
    if (most_key_sparsity > 0) {
      const int64_t rows = int64_t(max_groups_) * c.num_kv_heads * step_rows;
      KVPLAN_RETURN_IF_ERROR(leaving_keys_.Allocate(rows * c.head_dim * sizeof(float)));
      KVPLAN_RETURN_IF_ERROR(leaving_values_.Allocate(rows * c.head_dim * sizeof(float)));
      KVPLAN_RETURN_IF_ERROR(leaving_slots_.Allocate(rows * sizeof(int32_t)));
      KVPLAN_RETURN_IF_ERROR(leaving_count_.Allocate(int64_t(max_groups_) * c.num_kv_heads * sizeof(int32_t)));
      KVPLAN_RETURN_IF_ERROR(leaving_key_codes_.Allocate(rows * most_key_sparsity * sizeof(uint32_t)));
      KVPLAN_RETURN_IF_ERROR(leaving_value_codes_.Allocate(rows * most_value_sparsity * sizeof(uint32_t)));
    }

    // Pass metadata at fixed offsets.
    int64_t words = 0;
    auto take = [&](int64_t n) {
      const int64_t offset = words;
      words += n;
      return offset;
    };
    layout_.tokens = take(options_.max_rows);
    layout_.row_sequence = take(options_.max_rows);
    layout_.row_position = take(options_.max_rows);
    layout_.sequence = take(max_groups_);
    layout_.row_begin = take(max_groups_ + 1);
    layout_.flash_tiles = take(2 * cuda::flash_tile_bound(options_.max_rows, max_groups_));
    layout_.kept.assign(c.num_layers, -1);
    layout_.selected.assign(c.num_layers, -1);
    for (int l = 0; l < c.num_layers; ++l) {
      if (compressed_[l] == nullptr) continue;
      layout_.kept[l] = take(int64_t(max_groups_) * c.num_kv_heads);
      layout_.selected[l] = take(int64_t(max_groups_) * c.num_kv_heads);
    }
    layout_.words = words;
    for (int s = 0; s < kPinnedSlots; ++s) {
      KVPLAN_RETURN_IF_ERROR(pinned_[s].Allocate(words * sizeof(int32_t)));
      KVPLAN_CUDA(cudaEventCreateWithFlags(&copied_[s], cudaEventDisableTiming));
    }
    KVPLAN_RETURN_IF_ERROR(graph_pinned_.Allocate(words * sizeof(int32_t)));
    KVPLAN_RETURN_IF_ERROR(metadata_.Allocate(words * sizeof(int32_t)));
    return Reset();
  }

  int max_rows_per_sequence() const override { return max_rows_per_sequence_; }

  absl::Status BeginPass(const StepRows& rows, int begin, int end) override {
    slot_ = (slot_ + 1) % kPinnedSlots;
    KVPLAN_CUDA(cudaEventSynchronize(copied_[slot_]));
    KVPLAN_RETURN_IF_ERROR(Stage(rows, begin, end, pinned_[slot_]));
    KVPLAN_RETURN_IF_ERROR(Upload(pinned_[slot_]));
    KVPLAN_CUDA(cudaEventRecord(copied_[slot_], stream_));
    return absl::OkStatus();
  }

  absl::Status StageGraphPass(const StepRows& rows) override {
    return Stage(rows, 0, int(rows.tokens.size()), graph_pinned_);
  }
  absl::Status UploadGraphPass() override { return Upload(graph_pinned_); }

  const int32_t* tokens() const override { return metadata_.as<int32_t>() + layout_.tokens; }
  const int32_t* row_sequence() const override { return metadata_.as<int32_t>() + layout_.row_sequence; }
  const int32_t* row_position() const override { return metadata_.as<int32_t>() + layout_.row_position; }

  absl::Status Layer(int layer, const float* q, float* keys, const float* values, __nv_bfloat16* out) override {
    const ModelConfig& c = config_;
    const LayerPolicy& policy = policy_.layers[layer];
    if (policy.shares()) {
      // The donor, an earlier layer, already took this pass's rows; no bookkeeping is repeated.
      const int donor = policy.donor;
      if (compressed_[donor] == nullptr) return DenseAttention(layer_slot_[donor], q, out);
      const DeviceLayer& storage = *compressed_[donor];
      return CudaStatus(cuda::compressed_attention(storage.view, storage.tables_or_null(), Step(),
                                                   storage.refresh_or_null(), AttentionShape(storage),
                                                   attention_plans_[donor], q, out, nullptr,
                                                   compressed_workspace_.as<void>(), stream_),
                        "compressed_attention (shared)");
    }
    if (compressed_[layer] == nullptr) {
      const int slot = layer_slot_[layer];
      KVPLAN_CUDA(cuda::apply_rope(keys, row_position(), inv_freq_.as<float>(), rows_, c.num_kv_heads, c.head_dim,
                                   float(c.rope.attention_factor), stream_));
      KVPLAN_CUDA(cuda::append_kv(keys, values, row_sequence(), row_position(), rows_, c.num_kv_heads, c.head_dim,
                                  options_.capacity, SlotKeys(slot), SlotValues(slot), stream_));
      return DenseAttention(slot, q, out);
    }
    DeviceLayer& storage = *compressed_[layer];
    const bool key_norms = policy.budget && policy.budget->scoring == plan::TokenBudgets::KEY_L2_NORM;
    KVPLAN_CUDA(cuda::compressed_append(storage.view, Step(), keys, values, inv_freq_.as<float>(),
                                        float(c.rope.attention_factor), key_norms, stream_));
    Ops ops(*this, storage, layer, q, out);
    return AttendAndCompress(policy, ops);
  }

  absl::Status Reset() override { return Forget(0, options_.num_sequences); }
  absl::Status ResetSequence(int sequence) override { return Forget(sequence, sequence + 1); }

  // Empties sequences [first, end) of every compressed layer: their head slots' counts (entries past a count are
  // never read; a merged slot with no tokens is empty) and their RefreshKV state. Full-cache layers hold no
  // state beside the model's lengths.
  absl::Status Forget(int first, int end) {
    for (const auto& layer : compressed_)
      if (layer != nullptr) KVPLAN_RETURN_IF_ERROR(layer->arrays.ResetSequences(first, end, stream_));
    return absl::OkStatus();
  }

  absl::Status FillWithNoise(int context) override {
    if (context > options_.capacity)
      return absl::OutOfRangeError(absl::StrCat("context ", context, " > capacity ", options_.capacity));
    KVPLAN_RETURN_IF_ERROR(Reset());
    const ModelConfig& c = config_;
    const int64_t elements = int64_t(k_cache_.bytes() / sizeof(__nv_bfloat16));
    KVPLAN_CUDA(cuda::fill_noise_bf16(k_cache_.as<__nv_bfloat16>(), elements, 7, stream_));
    KVPLAN_CUDA(cuda::fill_noise_bf16(v_cache_.as<__nv_bfloat16>(), elements, 8, stream_));
    for (int l = 0; l < c.num_layers; ++l) {
      if (compressed_[l] == nullptr) continue;
      const DeviceLayer& layer = *compressed_[l];
      std::vector<int32_t> dense, coded, selected;
      std::vector<uint8_t> merged;
      for (int s = 0; s < options_.num_sequences; ++s)
        for (int h = 0; h < c.num_kv_heads; ++h) {
          const HeadEntries entries = ExpectedHeadEntries(layer.policy, h, context);
          dense.push_back(int32_t(entries.dense));
          coded.push_back(int32_t(entries.coded));
          merged.push_back(uint8_t(entries.merged));
          selected.push_back(layer.policy.refresh ? int32_t(SmallCacheTokens(*layer.policy.refresh, context)) : 0);
        }
      DeviceBuffer lengths, d_dense, d_coded, d_merged, d_selected;
      KVPLAN_RETURN_IF_ERROR(lengths.Upload(std::vector<int32_t>(options_.num_sequences, context)));
      KVPLAN_RETURN_IF_ERROR(d_dense.Upload(dense));
      KVPLAN_RETURN_IF_ERROR(d_coded.Upload(coded));
      KVPLAN_RETURN_IF_ERROR(d_merged.Upload(merged));
      KVPLAN_RETURN_IF_ERROR(d_selected.Upload(selected));
      KVPLAN_CUDA(cuda::fill_compressed_noise(layer.view,
                                              NoiseFill{.lengths = lengths.as<int32_t>(),
                                                        .dense = d_dense.as<int32_t>(),
                                                        .coded = d_coded.as<int32_t>(),
                                                        .merged = d_merged.as<uint8_t>(),
                                                        .selected = d_selected.as<int32_t>(),
                                                        .atoms = std::max(1, layer.tables.atoms),
                                                        .seed = uint32_t(l)},
                                              stream_));
      KVPLAN_CUDA(cudaStreamSynchronize(stream_));  // before the fill's arrays go
    }
    return absl::OkStatus();
  }

  int64_t reserved_bytes() const override {
    int64_t total = int64_t(k_cache_.bytes() + v_cache_.bytes());
    for (const auto& layer : compressed_)
      if (layer != nullptr) total += layer->arrays.bytes();
    return total;
  }

  absl::StatusOr<std::vector<HeadEntries>> ReadHeadEntries(int layer) const override {
    if (layer < 0 || layer >= int(compressed_.size()) || compressed_[layer] == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not compressed"));
    const DeviceLayer& storage = *compressed_[layer];
    const int n = storage.view.head_slots;
    std::vector<int32_t> dense(n), coded(n, 0);
    std::vector<float> merged(n, 0.0f);
    KVPLAN_CUDA(cudaStreamSynchronize(stream_));
    const DeviceCompressedLayer& arrays = storage.arrays;
    KVPLAN_CUDA(cudaMemcpy(dense.data(), arrays.dense_count.as<void>(), n * 4, cudaMemcpyDeviceToHost));
    if (arrays.coded_count.bytes() > 0)
      KVPLAN_CUDA(cudaMemcpy(coded.data(), arrays.coded_count.as<void>(), n * 4, cudaMemcpyDeviceToHost));
    if (arrays.merged_tokens.bytes() > 0)
      KVPLAN_CUDA(cudaMemcpy(merged.data(), arrays.merged_tokens.as<void>(), n * 4, cudaMemcpyDeviceToHost));
    std::vector<HeadEntries> entries(n);
    for (int i = 0; i < n; ++i) entries[i] = {.dense = dense[i], .coded = coded[i], .merged = merged[i] > 0.0f ? 1 : 0};
    return entries;
  }

 private:
  // The CUDA kernels, in the order AttendAndCompress calls them.
  class Ops {
   public:
    Ops(CudaKvCacheImpl& cache, DeviceLayer& layer, int index, const float* q, __nv_bfloat16* out)
        : cache_(cache),
          layer_(layer),
          step_(cache.Step()),
          targets_{.kept = cache.metadata_.as<int32_t>() + cache.layout_.kept[index],
                   .selected = cache.metadata_.as<int32_t>() + cache.layout_.selected[index]},
          plan_(cache.attention_plans_[index]),
          q_(q),
          out_(out) {}

    absl::Status DecideRefresh() {
      return CudaStatus(cuda::refresh_decide(layer_.refresh, step_, RefreshSettingsOf(*layer_.policy.refresh), q_,
                                             cache_.config_.num_heads, cache_.config_.head_dim, cache_.stream_),
                        "refresh_decide");
    }
    absl::Status Attend(bool probabilities) {
      const cuda::CompressedAttentionShape shape = cache_.AttentionShape(layer_);
      float* row_stats = probabilities ? cache_.row_stats_.as<float>() : nullptr;
      KVPLAN_CUDA(cuda::compressed_attention(layer_.view, layer_.tables_or_null(), step_, layer_.refresh_or_null(),
                                             shape, plan_, q_, out_, row_stats, cache_.compressed_workspace_.as<void>(),
                                             cache_.stream_));
      if (!probabilities) return absl::OkStatus();
      // Between RefreshKV full steps only attention-scored budgets read the probabilities.
      const bool scores = layer_.policy.budget && layer_.policy.budget->scoring == plan::TokenBudgets::ATTENTION_SCORE;
      return CudaStatus(
          cuda::entry_probabilities(layer_.view, layer_.tables_or_null(), step_, layer_.refresh_or_null(), shape, q_,
                                    row_stats, !scores, cache_.dense_probabilities_.as<float>(),
                                    cache_.coded_probabilities_.as_or_null<float>(), cache_.stream_),
          "entry_probabilities");
    }
    absl::Status UpdateScores() {
      return CudaStatus(cuda::update_scores(layer_.view, step_, layer_.policy.budget->score_decay,
                                            cache_.dense_probabilities_.as<float>(),
                                            cache_.coded_probabilities_.as_or_null<float>(), cache_.stream_),
                        "update_scores");
    }
    absl::Status SelectRefresh() {
      return CudaStatus(
          cuda::refresh_select(layer_.view, layer_.refresh, step_, targets_, RefreshSettingsOf(*layer_.policy.refresh),
                               cache_.dense_probabilities_.as<float>(), cache_.coded_probabilities_.as_or_null<float>(),
                               cache_.options_.capacity, cache_.position_workspace_.as<float>(), cache_.stream_),
          "refresh_select");
    }
    absl::Status Evict() {
      return CudaStatus(cuda::evict(layer_.view, layer_.tables_or_null(), step_, targets_,
                                    EvictionSettingsOf(layer_.policy), cache_.stream_),
                        "evict");
    }
    absl::Status CodeLeaving() {
      const CodingPolicy& coding = *layer_.policy.coding;
      const int hd = cache_.config_.head_dim, groups = step_.sequences * cache_.config_.num_kv_heads;
      const int max_leaving = cache_.groups_.max_rows;
      int32_t* slots = cache_.leaving_slots_.as<int32_t>();
      int32_t* counts = cache_.leaving_count_.as<int32_t>();
      uint32_t* key_codes = cache_.leaving_key_codes_.as<uint32_t>();
      uint32_t* value_codes = cache_.leaving_value_codes_.as<uint32_t>();
      KVPLAN_CUDA(cuda::gather_leaving_entries(layer_.view, layer_.tables, step_, coding.recent_window, max_leaving,
                                               cache_.leaving_keys_.as<float>(), cache_.leaving_values_.as<float>(),
                                               slots, counts, cache_.stream_));
      if (coding.quantized()) {
        const cuda::QuantizeJob jobs[] = {
            {cache_.leaving_keys_.as<float>(), coding.key_bits, layer_.key_channel_scale.as<float>(), key_codes},
            {cache_.leaving_values_.as<float>(), coding.value_bits, nullptr, value_codes}};
        KVPLAN_CUDA(cuda::quantize_vectors(jobs, 2, hd, cache_.config_.num_kv_heads, groups, max_leaving, counts,
                                           cache_.stream_));
      } else {
        const cuda::PursuitJob jobs[] = {
            {layer_.key_atoms.as<float>(), cache_.leaving_keys_.as<float>(), coding.key_sparsity, key_codes},
            {layer_.value_atoms.as<float>(), cache_.leaving_values_.as<float>(), coding.value_sparsity, value_codes}};
        KVPLAN_CUDA(
            cuda::matching_pursuit(jobs, 2, layer_.tables.atoms, hd, groups, max_leaving, counts, cache_.stream_));
      }
      return CudaStatus(cuda::commit_leaving_entries(layer_.view, step_, max_leaving, slots, counts, key_codes,
                                                     value_codes, cache_.stream_),
                        "commit_leaving_entries");
    }

   private:
    CudaKvCacheImpl& cache_;
    DeviceLayer& layer_;
    StepRowsView step_;
    StepTargets targets_;
    const cuda::CompressedAttentionPlan& plan_;
    const float* q_;
    __nv_bfloat16* out_;
  };

  // Writes the metadata of rows [begin, end) to `pinned` and remembers the pass's shape for the Layer calls.
  absl::Status Stage(const StepRows& rows, int begin, int end, const PinnedBuffer& pinned) {
    const int T = end - begin;
    if (T <= 0 || T > options_.max_rows)
      return absl::InvalidArgumentError(
          absl::StrCat("a pass of ", T, " rows; the cache takes 1 to ", options_.max_rows));
    groups_ = GroupRows(rows.sequences.data() + begin, rows.positions.data() + begin, T);
    const int G = int(groups_.sequence.size());
    if (G > max_groups_) return absl::InternalError("more sequences in a pass than the cache has");
    if (max_rows_per_sequence_ > 0 && groups_.max_rows > max_rows_per_sequence_)
      return absl::InternalError("a pass carries more rows of one sequence than the cache's chunk");
    rows_ = T;
    int32_t* words = pinned.as<int32_t>();
    std::copy_n(rows.tokens.data() + begin, T, words + layout_.tokens);
    std::copy_n(rows.sequences.data() + begin, T, words + layout_.row_sequence);
    std::copy_n(rows.positions.data() + begin, T, words + layout_.row_position);
    std::copy(groups_.sequence.begin(), groups_.sequence.end(), words + layout_.sequence);
    std::copy(groups_.row_begin.begin(), groups_.row_begin.end(), words + layout_.row_begin);
    flash_tile_count_ = UsesFlashAttention()
                            ? cuda::flash_tiles(groups_.row_begin.data(), G, words + layout_.flash_tiles)
                            : 0;
    for (int l = 0; l < config_.num_layers; ++l) {
      if (compressed_[l] == nullptr) continue;
      const StepCounts counts = CountsForStep(policy_.layers[l], config_.num_kv_heads, groups_);
      std::copy(counts.kept.begin(), counts.kept.end(), words + layout_.kept[l]);
      std::copy(counts.selected.begin(), counts.selected.end(), words + layout_.selected[l]);
      const DeviceLayer& layer = *compressed_[l];
      attention_plans_[l] =
          cuda::plan_compressed_attention(layer.view, layer.tables_or_null(), AttentionShape(layer), T, device_limits_);
    }
    return absl::OkStatus();
  }

  absl::Status Upload(const PinnedBuffer& pinned) {
    return CudaStatus(cudaMemcpyAsync(metadata_.as<int32_t>(), pinned.as<int32_t>(), layout_.words * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream_),
                      "metadata upload");
  }

  int64_t SlotElements() const {
    return int64_t(options_.num_sequences) * config_.num_kv_heads * options_.capacity * config_.head_dim;
  }
  __nv_bfloat16* SlotKeys(int slot) const { return k_cache_.as<__nv_bfloat16>() + slot * SlotElements(); }
  __nv_bfloat16* SlotValues(int slot) const { return v_cache_.as<__nv_bfloat16>() + slot * SlotElements(); }
  bool SharesFullLayer() const {
    for (const LayerPolicy& layer : policy_.layers)
      if (layer.shares() && policy_.layers[layer.donor].keeps_full_cache()) return true;
    return false;
  }

  StepRowsView Step() const {
    return StepRowsView{.rows = rows_,
                        .row_sequence = row_sequence(),
                        .row_position = row_position(),
                        .sequences = int(groups_.sequence.size()),
                        .sequence = metadata_.as<int32_t>() + layout_.sequence,
                        .row_begin = metadata_.as<int32_t>() + layout_.row_begin};
  }

  cuda::CompressedAttentionShape AttentionShape(const DeviceLayer& layer) const {
    return cuda::CompressedAttentionShape{
        .heads = config_.num_heads,
        .scale = 1.0f / std::sqrt(float(config_.head_dim)),
        .merge_compensation = layer.policy.budget ? layer.policy.budget->merge_compensation : 0.0f,
        .max_region = layer.max_region};
  }

  // A pass in which every sequence brings at least kFlashMinRows rows (a prompt's chunk) runs the full cache's
  // attention on tensor cores; decode steps and passes that mix them with prompts keep the split-KV kernel, which
  // spreads one row's long context over the GPU.
  static constexpr int kFlashMinRows = 16;
  bool UsesFlashAttention() const {
    const ModelConfig& c = config_;
    if (!cuda::flash_attention_supported(c.num_heads, c.num_kv_heads, c.head_dim)) return false;
    for (size_t g = 0; g + 1 < groups_.row_begin.size(); ++g)
      if (groups_.row_begin[g + 1] - groups_.row_begin[g] < kFlashMinRows) return false;
    return true;
  }

  absl::Status DenseAttention(int slot, const float* q, __nv_bfloat16* out) {
    const ModelConfig& c = config_;
    if (flash_tile_count_ > 0)
      return CudaStatus(cuda::flash_attention(q, row_sequence(), row_position(),
                                              metadata_.as<int32_t>() + layout_.flash_tiles, flash_tile_count_,
                                              c.num_heads, c.num_kv_heads, c.head_dim, options_.capacity,
                                              SlotKeys(slot), SlotValues(slot), 1.0f / std::sqrt(float(c.head_dim)),
                                              c.sliding_window, out, stream_),
                        "flash attention");
    return CudaStatus(
        cuda::attention(q, row_sequence(), row_position(), rows_, c.num_heads, c.num_kv_heads, c.head_dim,
                        options_.capacity, SlotKeys(slot), SlotValues(slot), 1.0f / std::sqrt(float(c.head_dim)),
                        c.sliding_window, options_.capacity, dense_workspace_.as<void>(), out, stream_),
        "attention");
  }

  absl::Status AllocateLayer(const LayerPolicy& policy, const LayerCodebook* codebook, DeviceLayer& layer) {
    const ModelConfig& c = config_;
    const int head_slots = options_.num_sequences * c.num_kv_heads, hd = c.head_dim, n = options_.num_sequences;
    layer.policy = policy;
    layer.regions = PlanRegions(policy, n, c.num_kv_heads, options_.capacity, max_rows_per_sequence_);
    for (int i = 0; i < head_slots; ++i)
      layer.max_region =
          std::max(layer.max_region, layer.regions.dense_begin[i + 1] - layer.regions.dense_begin[i] +
                                         layer.regions.coded_begin[i + 1] - layer.regions.coded_begin[i]);
    layer.max_region += 1;
    // The host storage's shape (ArrayShapeOf) says which arrays exist; the device holds the same ones.
    const CompressedArrayShape shape = ArrayShapeOf(policy, n, c.num_kv_heads, hd);
    KVPLAN_RETURN_IF_ERROR(layer.arrays.Allocate(shape, layer.regions.dense_begin, layer.regions.coded_begin));
    const bool coding = shape.key_sparsity > 0;
    const bool quantized = coding && policy.coding->quantized();
    if (quantized) {
      if (codebook->key_channel_scale.size() != size_t(c.num_kv_heads) * hd)
        return absl::InvalidArgumentError(absl::StrCat("a quantized layer has ", codebook->key_channel_scale.size(),
                                                       " key channel scales; the model has ", c.num_kv_heads * hd,
                                                       " key channels"));
      KVPLAN_RETURN_IF_ERROR(layer.key_channel_scale.Upload(codebook->key_channel_scale));
    } else if (coding) {
      KVPLAN_RETURN_IF_ERROR(layer.key_atoms.Upload(codebook->key_atoms));
      KVPLAN_RETURN_IF_ERROR(layer.value_atoms.Upload(codebook->value_atoms));
    }
    layer.view = layer.arrays.View();
    if (coding)
      layer.tables = CodingTables{.atoms = codebook->atoms,
                                  .key_atoms = layer.key_atoms.as_or_null<float>(),
                                  .value_atoms = layer.value_atoms.as_or_null<float>(),
                                  .key_bits = policy.coding->key_bits,
                                  .value_bits = policy.coding->value_bits,
                                  .key_channel_scale = layer.key_channel_scale.as_or_null<float>(),
                                  .keys_after_rope = policy.coding->keys_after_rope,
                                  .inv_freq = inv_freq_.as<float>(),
                                  .rope_attention_factor = float(c.rope.attention_factor)};
    layer.refresh = layer.arrays.RefreshView();
    return absl::OkStatus();
  }

  ModelConfig config_;
  CachePolicy policy_;
  CudaCacheOptions options_;
  cudaStream_t stream_;
  int max_rows_per_sequence_ = 0, max_groups_ = 0;
  int flash_tile_count_ = 0;  // the staged pass's prefill tiles; 0: its attention runs split-KV
  std::vector<int> layer_slot_;  // [layer] full-cache slot, -1 for other layers
  DeviceBuffer k_cache_, v_cache_;
  std::vector<std::unique_ptr<DeviceLayer>> compressed_;  // [layer], null for layers that do not compress
  // [layer]: how the staged pass's attention runs on each compressed layer (sharing layers take their donor's).
  std::vector<cuda::CompressedAttentionPlan> attention_plans_;
  cuda::DeviceLimits device_limits_;
  DeviceBuffer inv_freq_;
  // Scratch shared by the layers (they run one after another on one stream).
  DeviceBuffer dense_workspace_, compressed_workspace_, row_stats_, dense_probabilities_, coded_probabilities_;
  DeviceBuffer position_workspace_;
  DeviceBuffer leaving_keys_, leaving_values_, leaving_slots_, leaving_count_, leaving_key_codes_, leaving_value_codes_;
  // The pass in flight.
  PassLayout layout_;
  PinnedBuffer pinned_[kPinnedSlots];
  PinnedBuffer graph_pinned_;  // what captured graphs copy from
  cudaEvent_t copied_[kPinnedSlots] = {};
  int slot_ = 0;
  DeviceBuffer metadata_;
  StepGroups groups_;
  int rows_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CudaKvCache>> CreateCudaKvCache(
    const ModelConfig& config, const CachePolicy& policy,
    const std::vector<std::shared_ptr<const LayerCodebook>>& codebooks, const CudaCacheOptions& options,
    cudaStream_t stream) {
  if (int(policy.layers.size()) != config.num_layers)
    return absl::InvalidArgumentError(
        absl::StrCat("cache policy for ", policy.layers.size(), " layers, model has ", config.num_layers));
  if (options.num_sequences <= 0 || options.capacity <= 0 || options.max_rows <= 0)
    return absl::InvalidArgumentError("num_sequences, capacity and max_rows must be positive");
  auto cache = std::make_unique<CudaKvCacheImpl>(config, policy, options, stream);
  KVPLAN_RETURN_IF_ERROR(cache->Init(codebooks));
  return cache;
}

}  // namespace kvplan
