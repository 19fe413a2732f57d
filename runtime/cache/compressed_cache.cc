#include "runtime/cache/compressed_cache.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/compressed/append.h"
#include "kernels/cpu/compressed/attention.h"
#include "kernels/cpu/compressed/coding.h"
#include "kernels/cpu/compressed/eviction.h"
#include "kernels/cpu/compressed/noise.h"
#include "kernels/cpu/compressed/pursuit.h"
#include "kernels/cpu/compressed/scoring.h"
#include "runtime/cache/compressed_step.h"
#include "runtime/cache/sparse_coding.h"

namespace kvplan {
namespace {

class CompressedLayerCache : public LayerCache {
 public:
  CompressedLayerCache(const ModelConfig& config, int num_sequences, int capacity, int max_step_rows,
                       const LayerPolicy& policy, std::shared_ptr<const LayerCodebook> codebook)
      : config_(config),
        policy_(policy),
        num_sequences_(num_sequences),
        max_step_rows_(max_step_rows),
        codebook_(std::move(codebook)),
        inv_freq_(RopeInverseFrequencies(config)),
        storage_(MakeStorage(config, policy, num_sequences, capacity, max_step_rows)),
        layer_(storage_.View()),
        refresh_view_(storage_.RefreshView()) {
    if (NeedsProbabilities(policy)) {
      dense_probabilities_.resize(storage_.dense_begin.back());
      coded_probabilities_.resize(storage_.coded_begin.back());
    }
    if (codebook_)
      tables_ = CodingTables{.atoms = codebook_->atoms,
                             .key_atoms = codebook_->key_atoms.data(),
                             .value_atoms = codebook_->value_atoms.data(),
                             .key_bits = policy.coding->key_bits,
                             .value_bits = policy.coding->value_bits,
                             .key_channel_scale = codebook_->key_channel_scale.data(),
                             .keys_after_rope = policy.coding->keys_after_rope,
                             .inv_freq = inv_freq_.data(),
                             .rope_attention_factor = float(config.rope.attention_factor)};
  }

  // Entries past a count are never read, nor a merged slot with no tokens: a reset zeroes the counts and the
  // RefreshKV state (HostCompressedLayer::ResetSequences).
  void Reset() override { storage_.ResetSequences(0, num_sequences_); }
  void ResetSequence(int sequence) override { storage_.ResetSequences(sequence, sequence + 1); }

  void Append(int sequence, const int32_t* positions, int rows, const float* k_pre_rope, const float* k,
              const float* v) override {
    const Step step(sequence, positions, rows);
    std::vector<float> norms;
    if (policy_.budget && policy_.budget->scoring == plan::TokenBudgets::KEY_L2_NORM) {
      norms.resize(int64_t(rows) * config_.num_kv_heads);
      cpu::key_l2_norms(k_pre_rope, int64_t(norms.size()), config_.head_dim, norms.data());
    }
    cpu::compressed_append(layer_, step.view, k, v, DataOrNull(norms));
  }

  void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    const Step step(sequence, positions, rows);
    Ops ops(*this, step, q, out);
    const absl::Status status = AttendAndCompress(policy_, ops);
    if (!status.ok()) std::abort();  // the CPU operations cannot fail
  }

  void AttendShared(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    const Step step(sequence, positions, rows);
    cpu::compressed_attention(layer_, codebook_ ? &tables_ : nullptr, step.view,
                              policy_.refresh ? &refresh_view_ : nullptr, AttentionParams(), q, out, nullptr, nullptr);
  }

  void FillWithNoise(int context) override {
    Reset();
    const int kv_heads = config_.num_kv_heads;
    std::vector<int32_t> lengths(num_sequences_, context), dense, coded, selected;
    std::vector<uint8_t> merged;
    for (int s = 0; s < num_sequences_; ++s)
      for (int h = 0; h < kv_heads; ++h) {
        const HeadEntries entries = ExpectedHeadEntries(policy_, h, context);
        dense.push_back(int32_t(entries.dense));
        coded.push_back(int32_t(entries.coded));
        merged.push_back(uint8_t(entries.merged));
        selected.push_back(policy_.refresh ? int32_t(SmallCacheTokens(*policy_.refresh, context)) : 0);
      }
    cpu::fill_compressed_noise(layer_, NoiseFill{.lengths = lengths.data(),
                                                 .dense = dense.data(),
                                                 .coded = coded.data(),
                                                 .merged = merged.data(),
                                                 .selected = selected.data(),
                                                 .atoms = codebook_ ? codebook_->atoms : 1,
                                                 .seed = 7});
  }

  int64_t bytes() const override {
    int64_t total = 0;
    for (int i = 0; i < layer_.head_slots; ++i) {
      const HeadEntries entries{.dense = storage_.dense_count[i],
                                .coded = storage_.coded_count.empty() ? 0 : storage_.coded_count[i],
                                .merged = !storage_.merged_tokens.empty() && storage_.merged_tokens[i] > 0.0f ? 1 : 0};
      total += HeadBytes(policy_, config_.head_dim, entries);
    }
    return total;
  }

 private:
  // One sequence's rows as a step.
  struct Step {
    Step(int sequence, const int32_t* positions, int rows)
        : row_sequence(rows, sequence),
          groups(GroupRows(row_sequence.data(), positions, rows)),
          view(ViewOf(groups, row_sequence.data(), positions, rows)) {}
    std::vector<int32_t> row_sequence;
    StepGroups groups;
    StepRowsView view;
  };

  // The CPU references, in the order AttendAndCompress calls them.
  class Ops {
   public:
    Ops(CompressedLayerCache& cache, const Step& step, const float* q, float* out)
        : cache_(cache),
          step_(step),
          q_(q),
          out_(out),
          counts_(CountsForStep(cache.policy_, cache.config_.num_kv_heads, step.groups)),
          targets_{.kept = counts_.kept.data(), .selected = counts_.selected.data()} {}

    absl::Status DecideRefresh() {
      cpu::refresh_decide(cache_.refresh_view_, step_.view, RefreshSettingsOf(*cache_.policy_.refresh), q_,
                          cache_.config_.num_heads, cache_.config_.head_dim);
      return absl::OkStatus();
    }
    absl::Status Attend(bool probabilities) {
      // Between RefreshKV full steps only attention-scored budgets read the probabilities.
      const bool scores =
          cache_.policy_.budget && cache_.policy_.budget->scoring == plan::TokenBudgets::ATTENTION_SCORE;
      const bool full_step = cache_.policy_.refresh && cache_.storage_.full_step[step_.view.sequence[0]];
      const bool wanted = probabilities && (scores || full_step);
      cpu::compressed_attention(cache_.layer_, cache_.Tables(), step_.view,
                                cache_.policy_.refresh ? &cache_.refresh_view_ : nullptr, cache_.AttentionParams(), q_,
                                out_, wanted ? cache_.dense_probabilities_.data() : nullptr,
                                wanted ? cache_.coded_probabilities_.data() : nullptr);
      return absl::OkStatus();
    }
    absl::Status UpdateScores() {
      cpu::update_scores(cache_.layer_, step_.view, cache_.policy_.budget->score_decay,
                         cache_.dense_probabilities_.data(), cache_.coded_probabilities_.data());
      return absl::OkStatus();
    }
    absl::Status SelectRefresh() {
      cpu::refresh_select(cache_.layer_, cache_.refresh_view_, step_.view, targets_,
                          RefreshSettingsOf(*cache_.policy_.refresh), cache_.dense_probabilities_.data(),
                          cache_.coded_probabilities_.data());
      return absl::OkStatus();
    }
    absl::Status Evict() {
      cpu::evict(cache_.layer_, cache_.Tables(), step_.view, targets_, EvictionSettingsOf(cache_.policy_));
      return absl::OkStatus();
    }
    absl::Status CodeLeaving() {
      const CodingPolicy& coding = *cache_.policy_.coding;
      const LayerCodebook& codebook = *cache_.codebook_;
      const int hd = cache_.config_.head_dim, max_leaving = step_.groups.max_rows;
      const int64_t slots = int64_t(step_.view.sequences) * cache_.config_.num_kv_heads * max_leaving;
      std::vector<float> keys(slots * hd), values(slots * hd);
      std::vector<int32_t> leaving_slots(slots), leaving_count(slots / max_leaving);
      cpu::gather_leaving_entries(cache_.layer_, cache_.tables_, step_.view, coding.recent_window, max_leaving,
                                  keys.data(), values.data(), leaving_slots.data(), leaving_count.data());
      // Only the gathered rows are coded; rows past a group's count are never read.
      std::vector<int64_t> rows;
      for (int64_t group = 0; group < int64_t(leaving_count.size()); ++group)
        for (int t = 0; t < leaving_count[group]; ++t) rows.push_back(group * max_leaving + t);
      std::vector<uint32_t> key_codes(slots * coding.key_sparsity), value_codes(slots * coding.value_sparsity);
      if (coding.quantized()) {
        for (int64_t row : rows) {
          const int kv_head = int(row / max_leaving % cache_.config_.num_kv_heads);
          cpu::quantize_vector(keys.data() + row * hd, hd, coding.key_bits,
                               codebook.key_channel_scale.data() + int64_t(kv_head) * hd,
                               key_codes.data() + row * coding.key_sparsity);
          cpu::quantize_vector(values.data() + row * hd, hd, coding.value_bits, nullptr,
                               value_codes.data() + row * coding.value_sparsity);
        }
      } else if (!rows.empty()) {
        auto encode = [&](const std::vector<float>& vectors, const std::vector<float>& atoms, int sparsity,
                          std::vector<uint32_t>& codes) {
          std::vector<float> packed(rows.size() * hd);
          for (size_t i = 0; i < rows.size(); ++i)
            std::copy_n(vectors.data() + rows[i] * hd, hd, packed.data() + int64_t(i) * hd);
          const SparseCodes sparse =
              MatchingPursuit(atoms.data(), codebook.atoms, hd, packed.data(), int64_t(rows.size()), sparsity);
          for (size_t i = 0; i < rows.size(); ++i)
            for (int c = 0; c < sparsity; ++c)
              codes[rows[i] * sparsity + c] =
                  cpu::pack_code(sparse.indices[i * sparsity + c], sparse.coefficients[i * sparsity + c]);
        };
        encode(keys, codebook.key_atoms, coding.key_sparsity, key_codes);
        encode(values, codebook.value_atoms, coding.value_sparsity, value_codes);
      }
      cpu::commit_leaving_entries(cache_.layer_, step_.view, max_leaving, leaving_slots.data(), leaving_count.data(),
                                  key_codes.data(), value_codes.data());
      return absl::OkStatus();
    }

   private:
    CompressedLayerCache& cache_;
    const Step& step_;
    const float* q_;
    float* out_;
    StepCounts counts_;
    StepTargets targets_;
  };

  static HostCompressedLayer MakeStorage(const ModelConfig& config, const LayerPolicy& policy, int num_sequences,
                                         int capacity, int max_step_rows) {
    CompressedRegions regions = PlanRegions(policy, num_sequences, config.num_kv_heads, capacity, max_step_rows);
    return HostCompressedLayer(ArrayShapeOf(policy, num_sequences, config.num_kv_heads, config.head_dim),
                               std::move(regions.dense_begin), std::move(regions.coded_begin));
  }

  const CodingTables* Tables() const { return codebook_ ? &tables_ : nullptr; }
  cpu::CompressedAttentionParams AttentionParams() const {
    return cpu::CompressedAttentionParams{
        .heads = config_.num_heads,
        .scale = 1.0f / std::sqrt(float(config_.head_dim)),
        .merge_compensation = policy_.budget ? policy_.budget->merge_compensation : 0.0f};
  }

  ModelConfig config_;
  LayerPolicy policy_;
  int num_sequences_, max_step_rows_;
  std::shared_ptr<const LayerCodebook> codebook_;  // null unless the policy codes
  std::vector<float> inv_freq_;
  HostCompressedLayer storage_;
  std::vector<float> dense_probabilities_, coded_probabilities_;  // scratch the operations share within a step
  CompressedLayer layer_;
  CodingTables tables_;
  RefreshStateView refresh_view_;
};

class SharedLayerCache : public LayerCache {
 public:
  explicit SharedLayerCache(LayerCache* donor) : donor_(donor) {}
  void Append(int, const int32_t*, int, const float*, const float*, const float*) override {}
  void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    donor_->AttendShared(sequence, positions, rows, q, out);
  }
  void Reset() override {}
  void ResetSequence(int) override {}
  void FillWithNoise(int) override {}
  int64_t bytes() const override { return 0; }
  bool computes_kv() const override { return false; }

 private:
  LayerCache* donor_;
};

}  // namespace

std::unique_ptr<LayerCache> CreateCompressedLayerCache(const ModelConfig& config, int num_sequences, int capacity,
                                                       int max_step_rows, const LayerPolicy& policy,
                                                       std::shared_ptr<const LayerCodebook> codebook) {
  return std::make_unique<CompressedLayerCache>(config, num_sequences, capacity, max_step_rows, policy,
                                                std::move(codebook));
}

std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor) {
  return std::make_unique<SharedLayerCache>(donor);
}

}  // namespace kvplan
