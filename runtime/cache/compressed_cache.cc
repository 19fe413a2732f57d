#include "runtime/cache/compressed_cache.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "kernels/cpu_reference.h"
#include "runtime/cache/cache_decisions.h"
#include "runtime/cache/sparse_coding.h"

namespace kvplan {
namespace {

// The entries of one KV head of one sequence, in two segments.
struct HeadStore {
  // Coded entries (tokens that left the recent window): keys before RoPE.
  std::vector<int32_t> coded_positions;
  std::vector<uint16_t> key_atoms, value_atoms;
  std::vector<float> key_coefficients, value_coefficients;
  std::vector<float> coded_scores;
  // Dense entries: recent tokens and merged slots, keys after RoPE.
  std::vector<int32_t> dense_positions;
  std::vector<float> dense_keys, dense_values;
  std::vector<float> dense_scores;
  std::vector<float> dense_merged;  // tokens folded into the entry; 0 for a plain token
  std::vector<float> dense_bias;    // logit bias: compensation * log(merged) for merged slots

  int coded() const { return int(coded_positions.size()); }
  int dense() const { return int(dense_positions.size()); }
};

struct SequenceState {
  std::vector<HeadStore> heads;
  int length = 0;
  // RefreshKV: positions each head attends to between full steps.
  std::vector<std::vector<int32_t>> selected;
  RefreshState refresh;
};

template <typename T>
void EraseIndices(std::vector<T>& values, const std::vector<int>& sorted_indices, int width) {
  size_t write = 0, next = 0;
  const size_t count = values.size() / width;
  for (size_t read = 0; read < count; ++read) {
    if (next < sorted_indices.size() && size_t(sorted_indices[next]) == read) {
      ++next;
      continue;
    }
    if (write != read) std::copy_n(values.begin() + read * width, width, values.begin() + write * width);
    ++write;
  }
  values.resize(write * width);
}

class CompressedLayerCache : public LayerCache {
 public:
  CompressedLayerCache(const ModelConfig& config, int num_sequences, const LayerPolicy& policy,
                       std::shared_ptr<const LayerDictionaries> dictionaries)
      : config_(config),
        policy_(policy),
        dictionaries_(std::move(dictionaries)),
        inv_freq_(RopeInverseFrequencies(config)),
        sequences_(num_sequences) {
    Reset();
  }

  void Reset() override {
    for (SequenceState& state : sequences_) {
      state = SequenceState();
      state.heads.resize(config_.num_kv_heads);
      state.selected.resize(config_.num_kv_heads);
    }
  }

  void Append(int sequence, const int32_t* positions, int rows, const float* k_pre_rope, const float* k,
              const float* v) override {
    SequenceState& state = sequences_[sequence];
    const int hd = config_.head_dim;
    for (int r = 0; r < rows; ++r) {
      for (int h = 0; h < config_.num_kv_heads; ++h) {
        HeadStore& head = state.heads[h];
        const int64_t source = (int64_t(r) * config_.num_kv_heads + h) * hd;
        head.dense_positions.push_back(positions[r]);
        head.dense_keys.insert(head.dense_keys.end(), k + source, k + source + hd);
        head.dense_values.insert(head.dense_values.end(), v + source, v + source + hd);
        float score = 0.0f;
        if (policy_.budget && policy_.budget->scoring == plan::TokenBudgets::KEY_L2_NORM)
          cpu::key_l2_norms(k_pre_rope + source, 1, hd, &score);
        head.dense_scores.push_back(score);
        head.dense_merged.push_back(0.0f);
        head.dense_bias.push_back(0.0f);
      }
    }
    state.length = positions[rows - 1] + 1;
  }

  void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    AttendAndUpdate(sequence, positions, rows, q, out, /*update=*/true);
  }

  void AttendShared(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    AttendAndUpdate(sequence, positions, rows, q, out, /*update=*/false);
  }

  void AttendAndUpdate(int sequence, const int32_t* positions, int rows, const float* q, float* out, bool update) {
    SequenceState& state = sequences_[sequence];
    // A sharing layer sees what the owner saw this step: everything right after a refresh, else the subset.
    const std::vector<float> mean_query = policy_.refresh && update ? MeanLastQuery(q, rows) : std::vector<float>();
    const bool full_step = !policy_.refresh || (update ? NeedsFullStep(*policy_.refresh, state.refresh, mean_query)
                                                       : state.refresh.steps_since_refresh == 0);
    std::vector<std::vector<int>> coded_keep(config_.num_kv_heads), dense_keep(config_.num_kv_heads);
    std::vector<cpu::CodedHeadView> views = BuildViews(state, full_step, coded_keep, dense_keep);
    const bool want_probabilities =
        update && ((policy_.budget && policy_.budget->scoring == plan::TokenBudgets::ATTENTION_SCORE) ||
                   (policy_.refresh && full_step));
    int64_t total_entries = 0;
    for (const auto& view : views) total_entries += view.coded_length + view.dense.length;
    std::vector<float> probabilities(want_probabilities ? total_entries : 0);
    cpu::SparseAttentionParams params{.tokens = rows,
                                      .heads = config_.num_heads,
                                      .kv_heads = config_.num_kv_heads,
                                      .head_dim = config_.head_dim,
                                      .key_sparsity = policy_.coding ? policy_.coding->key_sparsity : 0,
                                      .value_sparsity = policy_.coding ? policy_.coding->value_sparsity : 0,
                                      .key_dictionary = dictionaries_ ? dictionaries_->key_atoms.data() : nullptr,
                                      .value_dictionary = dictionaries_ ? dictionaries_->value_atoms.data() : nullptr,
                                      .inv_freq = inv_freq_.data(),
                                      .rope_attention_factor = float(config_.rope.attention_factor),
                                      .scale = 1.0f / std::sqrt(float(config_.head_dim))};
    cpu::sparse_attention(params, q, positions, views.data(), out, want_probabilities ? probabilities.data() : nullptr);

    if (!update) return;
    if (want_probabilities) UpdateScores(state, coded_keep, dense_keep, probabilities);
    if (policy_.refresh) {
      if (full_step) {
        Reselect(state, coded_keep, dense_keep, probabilities);
        state.refresh = {.refresh_position = state.length, .steps_since_refresh = 0, .query = mean_query};
      } else {
        ++state.refresh.steps_since_refresh;
      }
    }
    Compress(state);
  }

  void FillWithNoise(int context) override {
    std::mt19937 generator(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int s = 0; s < int(sequences_.size()); ++s) {
      sequences_[s].heads.assign(config_.num_kv_heads, HeadStore());
      std::vector<int32_t> positions(context);
      std::iota(positions.begin(), positions.end(), 0);
      std::vector<float> k(int64_t(context) * config_.kv_dim()), v(k.size());
      for (float& value : k) value = normal(generator);
      for (float& value : v) value = normal(generator);
      constexpr int kChunk = 256;  // append and compress in chunks, as a prefill would
      for (int begin = 0; begin < context; begin += kChunk) {
        const int n = std::min(kChunk, context - begin);
        const int64_t offset = int64_t(begin) * config_.kv_dim();
        Append(s, positions.data() + begin, n, k.data() + offset, k.data() + offset, v.data() + offset);
        Compress(sequences_[s]);
      }
    }
  }

  int64_t bytes() const override {
    int64_t total = 0;
    for (const SequenceState& state : sequences_)
      for (const HeadStore& head : state.heads) {
        // The selection buffer is reserved at its full size, as a device layout must allocate it.
        const int64_t selected = policy_.refresh ? SmallCacheTokens(*policy_.refresh, state.length) : 0;
        total +=
            HeadBytes(policy_, config_.head_dim, {.dense = head.dense(), .coded = head.coded(), .selected = selected});
      }
    return total;
  }

 private:
  // Applies the budget, then codes what left the recent window.
  void Compress(SequenceState& state) {
    if (policy_.budget) Evict(state);
    if (policy_.coding) CodeOldEntries(state);
  }

  std::vector<float> MeanLastQuery(const float* q, int rows) const {
    const int hd = config_.head_dim;
    std::vector<float> mean(hd, 0.0f);
    const float* last = q + int64_t(rows - 1) * config_.num_heads * hd;
    for (int h = 0; h < config_.num_heads; ++h)
      for (int d = 0; d < hd; ++d) mean[d] += last[h * hd + d] / config_.num_heads;
    return mean;
  }

  // Views of every head; between refreshes only the selected positions and those appended since.
  std::vector<cpu::CodedHeadView> BuildViews(SequenceState& state, bool full_step,
                                             std::vector<std::vector<int>>& coded_keep,
                                             std::vector<std::vector<int>>& dense_keep) {
    const int hd = config_.head_dim;
    const int sk = policy_.coding ? policy_.coding->key_sparsity : 0;
    const int sv = policy_.coding ? policy_.coding->value_sparsity : 0;
    std::vector<cpu::CodedHeadView> views(config_.num_kv_heads);
    filtered_.assign(config_.num_kv_heads, HeadStore());
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      HeadStore& head = state.heads[h];
      auto in_view = [&](int32_t position) {
        if (full_step) return true;
        return position >= state.refresh.refresh_position ||
               std::binary_search(state.selected[h].begin(), state.selected[h].end(), position);
      };
      for (int e = 0; e < head.coded(); ++e)
        if (in_view(head.coded_positions[e])) coded_keep[h].push_back(e);
      for (int e = 0; e < head.dense(); ++e)
        if (in_view(head.dense_positions[e]) || head.dense_merged[e] > 0) dense_keep[h].push_back(e);
      const HeadStore* source = &head;
      if (!full_step) {
        HeadStore& subset = filtered_[h];
        for (int e : coded_keep[h]) {
          subset.coded_positions.push_back(head.coded_positions[e]);
          subset.key_atoms.insert(subset.key_atoms.end(), head.key_atoms.begin() + e * sk,
                                  head.key_atoms.begin() + (e + 1) * sk);
          subset.key_coefficients.insert(subset.key_coefficients.end(), head.key_coefficients.begin() + e * sk,
                                         head.key_coefficients.begin() + (e + 1) * sk);
          subset.value_atoms.insert(subset.value_atoms.end(), head.value_atoms.begin() + e * sv,
                                    head.value_atoms.begin() + (e + 1) * sv);
          subset.value_coefficients.insert(subset.value_coefficients.end(), head.value_coefficients.begin() + e * sv,
                                           head.value_coefficients.begin() + (e + 1) * sv);
        }
        for (int e : dense_keep[h]) {
          subset.dense_positions.push_back(head.dense_positions[e]);
          subset.dense_keys.insert(subset.dense_keys.end(), head.dense_keys.begin() + int64_t(e) * hd,
                                   head.dense_keys.begin() + int64_t(e + 1) * hd);
          subset.dense_values.insert(subset.dense_values.end(), head.dense_values.begin() + int64_t(e) * hd,
                                     head.dense_values.begin() + int64_t(e + 1) * hd);
          subset.dense_bias.push_back(head.dense_bias[e]);
        }
        source = &subset;
      }
      views[h] = {source->key_atoms.data(),
                  source->key_coefficients.data(),
                  source->value_atoms.data(),
                  source->value_coefficients.data(),
                  source->coded_positions.data(),
                  source->coded(),
                  cpu::KvHeadView{source->dense_keys.data(), source->dense_values.data(),
                                  source->dense_positions.data(), source->dense_bias.data(), source->dense()}};
    }
    return views;
  }

  void UpdateScores(SequenceState& state, const std::vector<std::vector<int>>& coded_keep,
                    const std::vector<std::vector<int>>& dense_keep, const std::vector<float>& probabilities) {
    if (!policy_.budget || policy_.budget->scoring != plan::TokenBudgets::ATTENTION_SCORE) return;
    const float decay = policy_.budget->score_decay;
    int64_t offset = 0;
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      HeadStore& head = state.heads[h];
      for (float& score : head.coded_scores) score *= decay;
      for (float& score : head.dense_scores) score *= decay;
      for (int e : coded_keep[h]) head.coded_scores[e] += probabilities[offset++];
      for (int e : dense_keep[h]) head.dense_scores[e] += probabilities[offset++];
    }
  }

  // RefreshKV: rebuild each head's selection from the full step's attention.
  void Reselect(SequenceState& state, const std::vector<std::vector<int>>& coded_keep,
                const std::vector<std::vector<int>>& dense_keep, const std::vector<float>& probabilities) {
    int64_t offset = 0;
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      const HeadStore& head = state.heads[h];
      std::vector<std::pair<int32_t, float>> scored;
      for (int e : coded_keep[h]) scored.push_back({head.coded_positions[e], probabilities[offset++]});
      for (int e : dense_keep[h]) scored.push_back({head.dense_positions[e], probabilities[offset++]});
      state.selected[h] = SelectRefreshPositions(*policy_.refresh, state.length, std::move(scored));
    }
  }

  // An entry eviction may remove: its segment and index there.
  struct Candidate {
    bool coded;
    int index;
    int32_t position;
  };

  // Enforces each head's budget: the victims ChooseEvictions names are dropped, or folded into the head's
  // merged slot.
  void Evict(SequenceState& state) {
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      HeadStore& head = state.heads[h];
      std::vector<Candidate> plain;
      std::vector<ScoredEntry> scored;
      for (int e = 0; e < head.coded(); ++e) {
        plain.push_back({true, e, head.coded_positions[e]});
        scored.push_back({head.coded_positions[e], head.coded_scores[e]});
      }
      for (int e = 0; e < head.dense(); ++e) {
        if (head.dense_merged[e] > 0) continue;
        plain.push_back({false, e, head.dense_positions[e]});
        scored.push_back({head.dense_positions[e], head.dense_scores[e]});
      }
      const std::vector<int> victims = ChooseEvictions(policy_, h, state.length, scored);
      if (victims.empty()) continue;
      std::vector<Candidate> chosen;
      std::vector<int> coded_victims, dense_victims;
      for (int i : victims) {
        chosen.push_back(plain[i]);
        (plain[i].coded ? coded_victims : dense_victims).push_back(plain[i].index);
      }
      if (policy_.budget->merge_evicted) Merge(head, chosen);
      RemoveCoded(head, coded_victims);
      RemoveDense(head, dense_victims);
    }
  }

  void RemoveDense(HeadStore& head, const std::vector<int>& victims) const {
    const int hd = config_.head_dim;
    EraseIndices(head.dense_positions, victims, 1);
    EraseIndices(head.dense_keys, victims, hd);
    EraseIndices(head.dense_values, victims, hd);
    EraseIndices(head.dense_scores, victims, 1);
    EraseIndices(head.dense_merged, victims, 1);
    EraseIndices(head.dense_bias, victims, 1);
  }

  void RemoveCoded(HeadStore& head, const std::vector<int>& victims) {
    if (victims.empty()) return;
    const int sk = policy_.coding->key_sparsity, sv = policy_.coding->value_sparsity;
    EraseIndices(head.coded_positions, victims, 1);
    EraseIndices(head.coded_scores, victims, 1);
    EraseIndices(head.key_atoms, victims, sk);
    EraseIndices(head.key_coefficients, victims, sk);
    EraseIndices(head.value_atoms, victims, sv);
    EraseIndices(head.value_coefficients, victims, sv);
  }

  // ZeroMerge: the merged slot holds the mean key and value of every token folded into it; its logit gets
  // compensation * log(count) so it carries their combined attention mass.
  void Merge(HeadStore& head, const std::vector<Candidate>& victims) {
    const int hd = config_.head_dim;
    int slot = -1;
    for (int e = 0; e < head.dense(); ++e)
      if (head.dense_merged[e] > 0) slot = e;
    if (slot < 0) {
      slot = head.dense();
      head.dense_positions.push_back(0);  // a merged slot is visible to every later query
      head.dense_keys.resize(head.dense_keys.size() + hd, 0.0f);
      head.dense_values.resize(head.dense_values.size() + hd, 0.0f);
      head.dense_scores.push_back(0.0f);
      head.dense_merged.push_back(0.0f);
      head.dense_bias.push_back(0.0f);
    }
    float* slot_key = head.dense_keys.data() + int64_t(slot) * hd;
    float* slot_value = head.dense_values.data() + int64_t(slot) * hd;
    std::vector<float> key(hd), value(hd);
    for (const auto& victim : victims) {
      if (victim.coded) {
        const int sk = policy_.coding->key_sparsity, sv = policy_.coding->value_sparsity;
        cpu::decode_sparse(dictionaries_->key_atoms.data(), hd, head.key_atoms.data() + victim.index * sk,
                           head.key_coefficients.data() + victim.index * sk, sk, key.data());
        cpu::apply_rope(key.data(), &victim.position, inv_freq_.data(), 1, 1, hd, float(config_.rope.attention_factor));
        cpu::decode_sparse(dictionaries_->value_atoms.data(), hd, head.value_atoms.data() + victim.index * sv,
                           head.value_coefficients.data() + victim.index * sv, sv, value.data());
      } else {
        std::copy_n(head.dense_keys.data() + int64_t(victim.index) * hd, hd, key.data());
        std::copy_n(head.dense_values.data() + int64_t(victim.index) * hd, hd, value.data());
      }
      cpu::merge_into_slot(key.data(), value.data(), 1, hd, slot_key, slot_value, &head.dense_merged[slot]);
    }
    head.dense_bias[slot] = policy_.budget->merge_compensation * std::log(head.dense_merged[slot]);
  }

  // CSR: plain dense entries older than the recent window are coded (keys un-rotated to pre-RoPE first).
  void CodeOldEntries(SequenceState& state) {
    const CodingPolicy& coding = *policy_.coding;
    const LayerDictionaries& dictionaries = *dictionaries_;
    const int hd = config_.head_dim;
    const float rope_factor = float(config_.rope.attention_factor);
    for (HeadStore& head : state.heads) {
      std::vector<int> moving;
      for (int e = 0; e < head.dense(); ++e)
        if (head.dense_merged[e] == 0 && LeavesCodingWindow(coding, state.length, head.dense_positions[e]))
          moving.push_back(e);
      if (moving.empty()) continue;
      const int n = int(moving.size());
      std::vector<float> keys(int64_t(n) * hd), values(int64_t(n) * hd);
      std::vector<int32_t> inverse_positions(n);
      for (int i = 0; i < n; ++i) {
        std::copy_n(head.dense_keys.data() + int64_t(moving[i]) * hd, hd, keys.data() + int64_t(i) * hd);
        std::copy_n(head.dense_values.data() + int64_t(moving[i]) * hd, hd, values.data() + int64_t(i) * hd);
        inverse_positions[i] = -head.dense_positions[moving[i]];
      }
      // Rotating by -position undoes RoPE (with YaRN's factor, the magnitude is divided back out).
      cpu::apply_rope(keys.data(), inverse_positions.data(), inv_freq_.data(), n, 1, hd, 1.0f);
      if (rope_factor != 1.0f)
        for (float& value : keys) value /= rope_factor;
      const SparseCodes key_codes =
          MatchingPursuit(dictionaries.key_atoms.data(), dictionaries.atoms, hd, keys.data(), n, coding.key_sparsity);
      const SparseCodes value_codes = MatchingPursuit(dictionaries.value_atoms.data(), dictionaries.atoms, hd,
                                                      values.data(), n, coding.value_sparsity);
      for (int i = 0; i < n; ++i) {
        head.coded_positions.push_back(head.dense_positions[moving[i]]);
        head.coded_scores.push_back(head.dense_scores[moving[i]]);
      }
      head.key_atoms.insert(head.key_atoms.end(), key_codes.indices.begin(), key_codes.indices.end());
      head.key_coefficients.insert(head.key_coefficients.end(), key_codes.coefficients.begin(),
                                   key_codes.coefficients.end());
      head.value_atoms.insert(head.value_atoms.end(), value_codes.indices.begin(), value_codes.indices.end());
      head.value_coefficients.insert(head.value_coefficients.end(), value_codes.coefficients.begin(),
                                     value_codes.coefficients.end());
      RemoveDense(head, moving);
    }
  }

  ModelConfig config_;
  LayerPolicy policy_;
  std::shared_ptr<const LayerDictionaries> dictionaries_;  // null unless the policy codes
  std::vector<float> inv_freq_;
  std::vector<SequenceState> sequences_;
  std::vector<HeadStore> filtered_;  // scratch: the refreshed subset of each head between full steps
};

class SharedLayerCache : public LayerCache {
 public:
  explicit SharedLayerCache(LayerCache* donor) : donor_(donor) {}
  void Append(int, const int32_t*, int, const float*, const float*, const float*) override {}
  void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    donor_->AttendShared(sequence, positions, rows, q, out);
  }
  void Reset() override {}
  void FillWithNoise(int) override {}
  int64_t bytes() const override { return 0; }
  bool computes_kv() const override { return false; }

 private:
  LayerCache* donor_;
};

}  // namespace

std::unique_ptr<LayerCache> CreateCompressedLayerCache(const ModelConfig& config, int num_sequences,
                                                       const LayerPolicy& policy,
                                                       std::shared_ptr<const LayerDictionaries> dictionaries) {
  return std::make_unique<CompressedLayerCache>(config, num_sequences, policy, std::move(dictionaries));
}

std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor) {
  return std::make_unique<SharedLayerCache>(donor);
}

}  // namespace kvplan
