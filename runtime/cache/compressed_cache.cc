#include "runtime/cache/compressed_cache.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "kernels/cpu_reference.h"
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
  // RefreshKV: positions each head attends to between full steps, and what the last full step saw.
  std::vector<std::vector<int32_t>> selected;
  int refresh_position = 0;  // tokens at or after this were appended since the last full step
  int steps_since_refresh = 0;
  std::vector<float> refresh_query;
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

float Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  return float(dot / std::sqrt(std::max(na * nb, 1e-30)));
}

class CompressedLayerCache : public LayerCache {
 public:
  CompressedLayerCache(const ModelConfig& config, int num_sequences, const LayerCachePolicy& policy)
      : config_(config), policy_(policy), inv_freq_(RopeInverseFrequencies(config)), sequences_(num_sequences) {
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
        if (policy_.budget != nullptr && policy_.budget->scoring == BudgetPolicy::Scoring::kKeyL2Norm)
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
    const bool full_step = update ? NeedsFullStep(state, q, rows)
                                  : policy_.refresh == nullptr || state.steps_since_refresh == 0;
    std::vector<std::vector<int>> coded_keep(config_.num_kv_heads), dense_keep(config_.num_kv_heads);
    std::vector<cpu::CodedHeadView> views = BuildViews(state, full_step, coded_keep, dense_keep);
    const bool want_probabilities = update &&
        ((policy_.budget != nullptr && policy_.budget->scoring == BudgetPolicy::Scoring::kAttention) ||
        (policy_.refresh != nullptr && full_step));
    int64_t total_entries = 0;
    for (const auto& view : views) total_entries += view.coded_length + view.dense.length;
    std::vector<float> probabilities(want_probabilities ? total_entries : 0);
    cpu::SparseAttentionParams params{
        .tokens = rows, .heads = config_.num_heads, .kv_heads = config_.num_kv_heads, .head_dim = config_.head_dim,
        .key_sparsity = policy_.dictionary ? policy_.dictionary->key_sparsity : 0,
        .value_sparsity = policy_.dictionary ? policy_.dictionary->value_sparsity : 0,
        .key_dictionary = policy_.dictionary ? policy_.dictionary->key_atoms.data() : nullptr,
        .value_dictionary = policy_.dictionary ? policy_.dictionary->value_atoms.data() : nullptr,
        .inv_freq = inv_freq_.data(), .rope_attention_factor = float(config_.rope.attention_factor),
        .scale = 1.0f / std::sqrt(float(config_.head_dim))};
    cpu::sparse_attention(params, q, positions, views.data(), out,
                          want_probabilities ? probabilities.data() : nullptr);

    if (!update) return;
    if (want_probabilities) UpdateScores(state, coded_keep, dense_keep, probabilities);
    if (policy_.refresh != nullptr) {
      if (full_step) {
        Reselect(state, coded_keep, dense_keep, probabilities);
        state.refresh_query = MeanLastQuery(q, rows);
      } else {
        ++state.steps_since_refresh;
      }
    }
    if (policy_.budget != nullptr) Evict(state);
    if (policy_.dictionary != nullptr) CodeOldEntries(state);
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
        if (policy_.budget != nullptr) Evict(sequences_[s]);
        if (policy_.dictionary != nullptr) CodeOldEntries(sequences_[s]);
      }
    }
  }

  int64_t bytes() const override {
    const int64_t dense_entry = 2 * int64_t(config_.head_dim) * 2;  // bf16 K and V
    const int64_t coded_entry =
        policy_.dictionary ? int64_t(policy_.dictionary->key_sparsity + policy_.dictionary->value_sparsity) * 4 : 0;
    // Evicting or coding breaks the position = index identity, so positions are stored (int32 each).
    const bool stores_positions = policy_.budget != nullptr || policy_.dictionary != nullptr;
    int64_t total = 0;
    for (const SequenceState& state : sequences_) {
      for (const HeadStore& head : state.heads) {
        total += head.dense() * dense_entry + head.coded() * coded_entry;
        if (stores_positions) total += int64_t(head.dense() + head.coded()) * 4;
      }
      for (const auto& selected : state.selected) total += int64_t(selected.size()) * 4;
    }
    return total;
  }

 private:
  bool NeedsFullStep(const SequenceState& state, const float* q, int rows) const {
    if (policy_.refresh == nullptr) return true;
    if (state.refresh_query.empty() || state.steps_since_refresh + 1 >= policy_.refresh->refresh_stride) return true;
    if (policy_.refresh->query_similarity_threshold > 0.0f &&
        Cosine(MeanLastQuery(q, rows), state.refresh_query) < policy_.refresh->query_similarity_threshold)
      return true;
    return false;
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
    const int sk = policy_.dictionary ? policy_.dictionary->key_sparsity : 0;
    const int sv = policy_.dictionary ? policy_.dictionary->value_sparsity : 0;
    std::vector<cpu::CodedHeadView> views(config_.num_kv_heads);
    filtered_.assign(config_.num_kv_heads, HeadStore());
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      HeadStore& head = state.heads[h];
      auto in_view = [&](int32_t position) {
        if (full_step) return true;
        return position >= state.refresh_position ||
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
          subset.key_atoms.insert(subset.key_atoms.end(), head.key_atoms.begin() + e * sk, head.key_atoms.begin() + (e + 1) * sk);
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
      views[h] = {source->key_atoms.data(), source->key_coefficients.data(), source->value_atoms.data(),
                  source->value_coefficients.data(), source->coded_positions.data(), source->coded(),
                  cpu::KvHeadView{source->dense_keys.data(), source->dense_values.data(),
                                  source->dense_positions.data(), source->dense_bias.data(), source->dense()}};
    }
    return views;
  }

  void UpdateScores(SequenceState& state, const std::vector<std::vector<int>>& coded_keep,
                    const std::vector<std::vector<int>>& dense_keep, const std::vector<float>& probabilities) {
    if (policy_.budget == nullptr || policy_.budget->scoring != BudgetPolicy::Scoring::kAttention) return;
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

  // RefreshKV: keep the K positions the full step attended to most, after max-pooling over neighbours.
  void Reselect(SequenceState& state, const std::vector<std::vector<int>>& coded_keep,
                const std::vector<std::vector<int>>& dense_keep, const std::vector<float>& probabilities) {
    const RefreshPolicy& refresh = *policy_.refresh;
    const int k = std::max(refresh.min_small_cache_tokens,
                           int(std::ceil(refresh.small_cache_fraction * state.length)));
    int64_t offset = 0;
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      const HeadStore& head = state.heads[h];
      std::vector<std::pair<int32_t, float>> scored;
      for (int e : coded_keep[h]) scored.push_back({head.coded_positions[e], probabilities[offset++]});
      for (int e : dense_keep[h]) scored.push_back({head.dense_positions[e], probabilities[offset++]});
      std::sort(scored.begin(), scored.end());
      std::vector<float> pooled(scored.size());
      const int radius = refresh.pool_kernel / 2;
      for (int i = 0; i < int(scored.size()); ++i) {
        pooled[i] = scored[i].second;
        for (int j = std::max(0, i - radius); j <= std::min(int(scored.size()) - 1, i + radius); ++j)
          pooled[i] = std::max(pooled[i], scored[j].second);
      }
      std::vector<int> order(scored.size());
      std::iota(order.begin(), order.end(), 0);
      const int keep = std::min<int>(k, int(order.size()));
      std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                        [&](int a, int b) { return pooled[a] != pooled[b] ? pooled[a] > pooled[b] : a > b; });
      state.selected[h].clear();
      for (int i = 0; i < keep; ++i) state.selected[h].push_back(scored[order[i]].first);
      std::sort(state.selected[h].begin(), state.selected[h].end());
    }
    state.refresh_position = state.length;
    state.steps_since_refresh = 0;
  }

  // An entry eviction may remove: its segment, index there, score and position.
  struct Candidate {
    bool coded;
    int index;
    float score;
    int32_t position;
  };

  // Enforces each head's budget: plain entries beyond the budget (never sinks or recent tokens) are dropped,
  // or folded into the head's merged slot.
  void Evict(SequenceState& state) {
    const BudgetPolicy& budget = *policy_.budget;
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      HeadStore& head = state.heads[h];
      const int allowed = std::max(budget.min_tokens, int(std::ceil(budget.head_keep_fraction[h] * state.length)));
      std::vector<Candidate> candidates;
      int plain = head.coded();
      for (int e = 0; e < head.coded(); ++e) candidates.push_back({true, e, head.coded_scores[e], head.coded_positions[e]});
      for (int e = 0; e < head.dense(); ++e) {
        if (head.dense_merged[e] > 0) continue;
        ++plain;
        candidates.push_back({false, e, head.dense_scores[e], head.dense_positions[e]});
      }
      std::erase_if(candidates, [&](const Candidate& c) {
        return c.position < budget.sink_tokens || c.position >= state.length - budget.recent_window;
      });
      const int excess = std::min<int>(plain - allowed, int(candidates.size()));
      if (excess <= 0) continue;
      // Victims first: high key norm (L2 keeps the lowest norms) or low accumulated attention; older first on ties.
      const bool by_norm = budget.scoring == BudgetPolicy::Scoring::kKeyL2Norm;
      std::partial_sort(candidates.begin(), candidates.begin() + excess, candidates.end(),
                        [&](const Candidate& a, const Candidate& b) {
                          if (a.score != b.score) return by_norm ? a.score > b.score : a.score < b.score;
                          return a.position < b.position;
                        });
      candidates.resize(excess);
      if (budget.merge_evicted) Merge(head, candidates);
      std::vector<int> coded_victims, dense_victims;
      for (const Candidate& c : candidates) (c.coded ? coded_victims : dense_victims).push_back(c.index);
      std::sort(coded_victims.begin(), coded_victims.end());
      std::sort(dense_victims.begin(), dense_victims.end());
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
    const int sk = policy_.dictionary->key_sparsity, sv = policy_.dictionary->value_sparsity;
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
        const int sk = policy_.dictionary->key_sparsity, sv = policy_.dictionary->value_sparsity;
        cpu::decode_sparse(policy_.dictionary->key_atoms.data(), hd, head.key_atoms.data() + victim.index * sk,
                           head.key_coefficients.data() + victim.index * sk, sk, key.data());
        cpu::apply_rope(key.data(), &victim.position, inv_freq_.data(), 1, 1, hd, float(config_.rope.attention_factor));
        cpu::decode_sparse(policy_.dictionary->value_atoms.data(), hd, head.value_atoms.data() + victim.index * sv,
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
    const DictionaryPolicy& dictionary = *policy_.dictionary;
    const int hd = config_.head_dim;
    const float rope_factor = float(config_.rope.attention_factor);
    for (HeadStore& head : state.heads) {
      std::vector<int> moving;
      for (int e = 0; e < head.dense(); ++e)
        if (head.dense_merged[e] == 0 && head.dense_positions[e] < state.length - dictionary.recent_window)
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
          MatchingPursuit(dictionary.key_atoms.data(), dictionary.atoms, hd, keys.data(), n, dictionary.key_sparsity);
      const SparseCodes value_codes = MatchingPursuit(dictionary.value_atoms.data(), dictionary.atoms, hd,
                                                      values.data(), n, dictionary.value_sparsity);
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
  LayerCachePolicy policy_;
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
                                                       const LayerCachePolicy& policy) {
  return std::make_unique<CompressedLayerCache>(config, num_sequences, policy);
}

std::unique_ptr<LayerCache> CreateSharedLayerCache(LayerCache* donor) {
  return std::make_unique<SharedLayerCache>(donor);
}

}  // namespace kvplan
