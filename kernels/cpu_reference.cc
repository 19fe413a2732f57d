#include "kernels/cpu_reference.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

#include "base/number_formats.h"

namespace kvplan::cpu {

void rms_norm(const float* x, const float* weight, int64_t rows, int dim, float eps, float* out) {
#pragma omp parallel for if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double sum_squares = 0.0;
    for (int i = 0; i < dim; ++i) sum_squares += double(row[i]) * row[i];
    const float inv_rms = 1.0f / std::sqrt(float(sum_squares / dim) + eps);
    for (int i = 0; i < dim; ++i) out[r * dim + i] = row[i] * inv_rms * weight[i];
  }
}

void apply_rope(float* x, const int32_t* positions, const float* inv_freq, int tokens, int heads, int head_dim,
                float attention_factor) {
  const int half = head_dim / 2;
#pragma omp parallel for if (tokens > 16)
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> cos_table(half), sin_table(half);
    for (int i = 0; i < half; ++i) {
      // double keeps the angle exact at long positions; fp32 loses ~1e-3 rad by position 32K.
      const double angle = double(positions[t]) * inv_freq[i];
      cos_table[i] = float(std::cos(angle)) * attention_factor;
      sin_table[i] = float(std::sin(angle)) * attention_factor;
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (int64_t(t) * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_table[i] - b * sin_table[i];
        v[i + half] = b * cos_table[i] + a * sin_table[i];
      }
    }
  }
}

void fill_noise_bf16(uint16_t* out, int64_t n, uint32_t seed) {
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16(2.0f * NoiseValue(NoiseBits(seed, i)));
}

void add_row_bias(float* x, const float* bias, int64_t rows, int dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < dim; ++i) x[r * dim + i] += bias[i];
}

void swiglu(const float* gate_up, int64_t rows, int ffn, float* out) {
#pragma omp parallel for if (rows * ffn > 65536)
  for (int64_t r = 0; r < rows; ++r)
    for (int i = 0; i < ffn; ++i) {
      const float gate = gate_up[r * 2 * ffn + i], up = gate_up[r * 2 * ffn + ffn + i];
      out[r * ffn + i] = gate / (1.0f + std::exp(-gate)) * up;
    }
}

void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out) {
  const int group = heads / kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      const KvHeadView& cache = kv[h / group];
      const float* query = q + (int64_t(t) * heads + h) * head_dim;
      float* result = out + (int64_t(t) * heads + h) * head_dim;
      const int32_t query_position = query_positions[t];
      std::vector<float> logits(cache.length);
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < cache.length; ++j) {
        const int32_t distance = query_position - cache.positions[j];
        if (distance < 0 || (sliding_window > 0 && distance >= sliding_window)) {
          logits[j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float* key = cache.keys + int64_t(j) * head_dim;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot += query[d] * key[d];
        logits[j] = dot * scale;
        max_logit = std::max(max_logit, logits[j]);
      }
      std::fill(result, result + head_dim, 0.0f);
      if (max_logit == -std::numeric_limits<float>::infinity()) continue;
      double denominator = 0.0;
      for (int j = 0; j < cache.length; ++j) {
        if (logits[j] == -std::numeric_limits<float>::infinity()) continue;
        const float weight = std::exp(logits[j] - max_logit);
        denominator += weight;
        const float* value = cache.values + int64_t(j) * head_dim;
        for (int d = 0; d < head_dim; ++d) result[d] += weight * value[d];
      }
      const float inv = float(1.0 / denominator);
      for (int d = 0; d < head_dim; ++d) result[d] *= inv;
    }
  }
}

float round_to_fp16(float value) { return Fp16ToFloat(FloatToFp16(value)); }

uint32_t pack_code(uint16_t atom, float coefficient) { return PackCode(atom, FloatToFp16(coefficient)); }

void matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int sparsity, uint16_t* indices,
                      float* coefficients) {
  std::vector<float> residual(x, x + dim);
  for (int s = 0; s < sparsity; ++s) {
    int best = 0;
    float best_correlation = 0.0f;
    for (int a = 0; a < atoms; ++a) {
      const float* atom = dictionary + int64_t(a) * dim;
      float correlation = 0.0f;
      for (int d = 0; d < dim; ++d) correlation += residual[d] * atom[d];
      if (std::fabs(correlation) > std::fabs(best_correlation)) {
        best = a;
        best_correlation = correlation;
      }
    }
    const float coefficient = round_to_fp16(best_correlation);
    indices[s] = uint16_t(best);
    coefficients[s] = coefficient;
    const float* atom = dictionary + int64_t(best) * dim;
    for (int d = 0; d < dim; ++d) residual[d] -= coefficient * atom[d];
  }
}

void decode_sparse(const float* dictionary, int dim, const uint16_t* indices, const float* coefficients, int sparsity,
                   float* out) {
  std::fill(out, out + dim, 0.0f);
  for (int s = 0; s < sparsity; ++s) {
    const float* atom = dictionary + int64_t(indices[s]) * dim;
    for (int d = 0; d < dim; ++d) out[d] += coefficients[s] * atom[d];
  }
}

void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int d = 0; d < head_dim; ++d) sum += double(keys[i * head_dim + d]) * keys[i * head_dim + d];
    norms[i] = float(std::sqrt(sum));
  }
}

void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens) {
  // An empty slot's means are whatever a reset left there (never read): the first token starts them afresh.
  if (count > 0 && *slot_tokens == 0.0f) {
    std::fill_n(slot_key, head_dim, 0.0f);
    std::fill_n(slot_value, head_dim, 0.0f);
  }
  for (int i = 0; i < count; ++i) {
    const float tokens = *slot_tokens + 1.0f;
    for (int d = 0; d < head_dim; ++d) {
      slot_key[d] += (keys[int64_t(i) * head_dim + d] - slot_key[d]) / tokens;
      slot_value[d] += (values[int64_t(i) * head_dim + d] - slot_value[d]) / tokens;
    }
    *slot_tokens = tokens;
  }
}

// --- Compressed layer caches ---------------------------------------------------------------------------------

namespace {

int64_t HeadSlot(const CompressedLayer& layer, const StepRowsView& step, int j, int kv_head) {
  return int64_t(step.sequence[j]) * layer.kv_heads + kv_head;
}

int32_t StepLength(const StepRowsView& step, int j) { return step.row_position[step.row_begin[j + 1] - 1] + 1; }

// Host-side overflow of a region is a bug in the caller's sizing, never an input error: stop rather than corrupt.
void RequireSlot(bool fits) {
  if (!fits) std::abort();
}

// The key and value of coded entry `slot` of KV head `kv_head` as attention sees them: keys after RoPE.
void DecodeCodedEntry(const CompressedLayer& layer, const CodingTables& tables, int kv_head, int64_t slot, float* key,
                      float* value) {
  const int hd = layer.head_dim;
  if (tables.key_bits > 0) {
    dequantize_vector(layer.key_codes + slot * layer.key_sparsity, hd, tables.key_bits,
                      tables.key_channel_scale + int64_t(kv_head) * hd, key);
    dequantize_vector(layer.value_codes + slot * layer.value_sparsity, hd, tables.value_bits, nullptr, value);
    return;
  }
  decode_codes(tables.key_atoms, hd, layer.key_codes + slot * layer.key_sparsity, layer.key_sparsity, key);
  if (!tables.keys_after_rope)
    apply_rope(key, layer.coded_positions + slot, tables.inv_freq, 1, 1, hd, tables.rope_attention_factor);
  decode_codes(tables.value_atoms, hd, layer.value_codes + slot * layer.value_sparsity, layer.value_sparsity, value);
}

// Moves every per-slot array of a dense region (base = first slot of the head's region).
void MoveDenseSlot(const CompressedLayer& layer, int64_t from, int64_t to) {
  const int hd = layer.head_dim;
  std::copy_n(layer.dense_keys + from * hd, hd, layer.dense_keys + to * hd);
  std::copy_n(layer.dense_values + from * hd, hd, layer.dense_values + to * hd);
  layer.dense_positions[to] = layer.dense_positions[from];
  if (layer.dense_scores) layer.dense_scores[to] = layer.dense_scores[from];
  if (layer.dense_selected) layer.dense_selected[to] = layer.dense_selected[from];
}

void MoveCodedSlot(const CompressedLayer& layer, int64_t from, int64_t to) {
  std::copy_n(layer.key_codes + from * layer.key_sparsity, layer.key_sparsity,
              layer.key_codes + to * layer.key_sparsity);
  std::copy_n(layer.value_codes + from * layer.value_sparsity, layer.value_sparsity,
              layer.value_codes + to * layer.value_sparsity);
  layer.coded_positions[to] = layer.coded_positions[from];
  if (layer.coded_scores) layer.coded_scores[to] = layer.coded_scores[from];
  if (layer.coded_selected) layer.coded_selected[to] = layer.coded_selected[from];
}

// Removes the marked slots of a region starting at `base` with `*count` live slots.
template <typename Move>
void CompactRegion(const std::vector<uint8_t>& removed, int64_t base, int32_t* count, Move move) {
  for (const auto& [from, to] : CompactionMoves(removed.data(), *count)) move(base + from, base + to);
  *count -= int32_t(std::count(removed.begin(), removed.begin() + *count, uint8_t(1)));
}

}  // namespace

std::vector<std::pair<int, int>> CompactionMoves(const uint8_t* removed, int live) {
  const int remaining = live - int(std::count(removed, removed + live, uint8_t(1)));
  std::vector<int> holes, movers;
  for (int i = 0; i < remaining; ++i)
    if (removed[i]) holes.push_back(i);
  for (int i = remaining; i < live; ++i)
    if (!removed[i]) movers.push_back(i);
  std::vector<std::pair<int, int>> moves;
  for (size_t t = 0; t < holes.size(); ++t) moves.push_back({movers[t], holes[t]});
  return moves;
}

void quantize_vector(const float* x, int dim, int bits, const float* channel_scale, uint32_t* words) {
  std::vector<float> y(x, x + dim);
  if (channel_scale)
    for (int d = 0; d < dim; ++d) y[d] /= channel_scale[d];
  const auto [low, high] = std::minmax_element(y.begin(), y.end());
  const float levels = float((1u << bits) - 1u);
  const uint16_t minimum_bits = FloatToFp16(*low);
  const float minimum = Fp16ToFloat(minimum_bits);
  const uint16_t scale_bits = FloatToFp16((*high - minimum) / levels);
  const float scale = Fp16ToFloat(scale_bits);
  std::fill_n(words, QuantizedWords(dim, bits), 0u);
  words[0] = uint32_t(scale_bits) | (uint32_t(minimum_bits) << 16);
  for (int d = 0; d < dim; ++d) {
    const float level = scale > 0.0f ? std::clamp(std::nearbyint((y[d] - minimum) / scale), 0.0f, levels) : 0.0f;
    words[1 + d * bits / 32] |= uint32_t(level) << ((d * bits) % 32);
  }
}

void dequantize_vector(const uint32_t* words, int dim, int bits, const float* channel_scale, float* out) {
  const float scale = Fp16ToFloat(uint16_t(words[0] & 0xffff)), minimum = Fp16ToFloat(uint16_t(words[0] >> 16));
  for (int d = 0; d < dim; ++d) {
    out[d] = minimum + scale * float(QuantizedLevel(words, d, bits));
    if (channel_scale) out[d] *= channel_scale[d];
  }
}

void decode_codes(const float* dictionary, int dim, const uint32_t* codes, int sparsity, float* out) {
  std::fill(out, out + dim, 0.0f);
  for (int s = 0; s < sparsity; ++s) {
    const float coefficient = Fp16ToFloat(uint16_t(codes[s] >> 16));
    const float* atom = dictionary + int64_t(codes[s] & 0xffff) * dim;
    for (int d = 0; d < dim; ++d) out[d] += coefficient * atom[d];
  }
}

void compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys, const float* values,
                       const float* key_norms) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      for (int r = step.row_begin[j]; r < step.row_begin[j + 1]; ++r) {
        const int64_t slot = layer.dense_begin[head] + layer.dense_count[head]++;
        RequireSlot(slot < layer.dense_begin[head + 1]);
        const int64_t source = (int64_t(r) * layer.kv_heads + h) * hd;
        for (int d = 0; d < hd; ++d) {
          layer.dense_keys[slot * hd + d] = FloatToBf16(keys[source + d]);
          layer.dense_values[slot * hd + d] = FloatToBf16(values[source + d]);
        }
        layer.dense_positions[slot] = step.row_position[r];
        if (layer.dense_scores)
          layer.dense_scores[slot] = key_norms ? key_norms[int64_t(r) * layer.kv_heads + h] : 0.0f;
        if (layer.dense_selected) layer.dense_selected[slot] = 0;
      }
    }
}

void compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                          const RefreshStateView* refresh, const CompressedAttentionParams& params, const float* q,
                          float* out, float* dense_probabilities, float* coded_probabilities) {
  const int hd = layer.head_dim, group = params.heads / layer.kv_heads;
  const bool want_probabilities = dense_probabilities != nullptr;
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    const int row_begin = step.row_begin[j], rows = step.row_begin[j + 1] - row_begin;
    const bool subset = refresh != nullptr && !refresh->full_step[sequence];
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      const int coded = layer.coded_count ? layer.coded_count[head] : 0, dense = layer.dense_count[head];
      const bool merged = layer.merged_tokens != nullptr && layer.merged_tokens[head] > 0.0f;
      const int entries = coded + dense + (merged ? 1 : 0);
      // This head's keys (after RoPE) and values, materialised once for every row and group head.
      std::vector<float> keys(int64_t(entries) * hd), values(int64_t(entries) * hd), bias(entries, 0.0f);
      std::vector<int32_t> positions(entries);
      std::vector<uint8_t> in_view(entries, 1);
#pragma omp parallel for if (coded > 64)
      for (int e = 0; e < coded; ++e) {
        const int64_t slot = layer.coded_begin[head] + e;
        DecodeCodedEntry(layer, *tables, h, slot, keys.data() + int64_t(e) * hd, values.data() + int64_t(e) * hd);
        positions[e] = layer.coded_positions[slot];
        if (subset) in_view[e] = layer.coded_selected[slot] || positions[e] >= refresh->refresh_position[sequence];
      }
      for (int e = 0; e < dense; ++e) {
        const int64_t slot = layer.dense_begin[head] + e, target = coded + e;
        for (int d = 0; d < hd; ++d) {
          keys[target * hd + d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
          values[target * hd + d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
        }
        positions[target] = layer.dense_positions[slot];
        if (subset)
          in_view[target] = layer.dense_selected[slot] || positions[target] >= refresh->refresh_position[sequence];
      }
      if (merged) {
        const int target = entries - 1;
        std::copy_n(layer.merged_keys + head * hd, hd, keys.data() + int64_t(target) * hd);
        std::copy_n(layer.merged_values + head * hd, hd, values.data() + int64_t(target) * hd);
        positions[target] = std::numeric_limits<int32_t>::min();  // seen by every row
        bias[target] = params.merge_compensation * std::log(layer.merged_tokens[head]);
      }
      std::vector<float> row_probabilities(want_probabilities ? int64_t(rows) * group * entries : 0, 0.0f);
#pragma omp parallel for collapse(2) schedule(dynamic)
      for (int t = 0; t < rows; ++t) {
        for (int g = 0; g < group; ++g) {
          const int row = row_begin + t, query_head = h * group + g;
          const float* query = q + (int64_t(row) * params.heads + query_head) * hd;
          float* result = out + (int64_t(row) * params.heads + query_head) * hd;
          const int32_t query_position = step.row_position[row];
          std::vector<float> weights(entries, 0.0f);
          std::vector<uint8_t> seen(entries, 0);
          float max_logit = -std::numeric_limits<float>::infinity();
          for (int e = 0; e < entries; ++e) {
            if (!in_view[e] || positions[e] > query_position) continue;
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot += query[d] * keys[int64_t(e) * hd + d];
            weights[e] = dot * params.scale + bias[e];
            seen[e] = 1;
            max_logit = std::max(max_logit, weights[e]);
          }
          std::fill(result, result + hd, 0.0f);
          if (max_logit == -std::numeric_limits<float>::infinity()) continue;
          double denominator = 0.0;
          for (int e = 0; e < entries; ++e) {
            if (!seen[e]) continue;
            weights[e] = std::exp(weights[e] - max_logit);
            denominator += weights[e];
            for (int d = 0; d < hd; ++d) result[d] += weights[e] * values[int64_t(e) * hd + d];
          }
          for (int d = 0; d < hd; ++d) result[d] = float(result[d] / denominator);
          if (want_probabilities)
            for (int e = 0; e < entries; ++e)
              if (seen[e]) row_probabilities[(int64_t(t) * group + g) * entries + e] = float(weights[e] / denominator);
        }
      }
      if (!want_probabilities) continue;
      for (int e = 0; e < coded + dense; ++e) {
        float probability = 0.0f;
        for (int64_t row_group = 0; row_group < int64_t(rows) * group; ++row_group)
          probability = std::max(probability, row_probabilities[row_group * entries + e]);
        if (e < coded)
          coded_probabilities[layer.coded_begin[head] + e] = probability;
        else
          dense_probabilities[layer.dense_begin[head] + e - coded] = probability;
      }
    }
  }
}

void update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                   const float* dense_probabilities, const float* coded_probabilities) {
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot)
        layer.dense_scores[slot] = layer.dense_scores[slot] * decay + dense_probabilities[slot];
      if (layer.coded_count == nullptr) continue;
      for (int64_t slot = layer.coded_begin[head]; slot < layer.coded_begin[head] + layer.coded_count[head]; ++slot)
        layer.coded_scores[slot] = layer.coded_scores[slot] * decay + coded_probabilities[slot];
    }
}

void refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                    const float* q, int heads, int head_dim) {
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    const float* last = q + int64_t(step.row_begin[j + 1] - 1) * heads * head_dim;
    float* mean = state.step_query + int64_t(sequence) * head_dim;
    std::fill(mean, mean + head_dim, 0.0f);
    for (int h = 0; h < heads; ++h)
      for (int d = 0; d < head_dim; ++d) mean[d] += last[h * head_dim + d] / heads;
    bool full = !state.has_query[sequence] || state.steps_since_refresh[sequence] + 1 >= settings.refresh_stride;
    if (!full && settings.query_similarity_threshold > 0.0f) {
      const float* previous = state.query + int64_t(sequence) * head_dim;
      double dot = 0, na = 0, nb = 0;
      for (int d = 0; d < head_dim; ++d) {
        dot += double(mean[d]) * previous[d];
        na += double(mean[d]) * mean[d];
        nb += double(previous[d]) * previous[d];
      }
      full = dot / std::sqrt(std::max(na * nb, 1e-30)) < settings.query_similarity_threshold;
    }
    state.full_step[sequence] = full;
  }
}

void refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                    const StepTargets& targets, const RefreshSettings& settings, const float* dense_probabilities,
                    const float* coded_probabilities) {
  const int radius = settings.pool_kernel / 2;
  for (int j = 0; j < step.sequences; ++j) {
    const int sequence = step.sequence[j];
    if (!state.full_step[sequence]) {
      ++state.steps_since_refresh[sequence];
      continue;
    }
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      struct Entry {
        int32_t position;
        float probability;
        uint8_t* selected;
      };
      std::vector<Entry> entries;
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot)
        entries.push_back({layer.dense_positions[slot], dense_probabilities[slot], layer.dense_selected + slot});
      if (layer.coded_count != nullptr)
        for (int64_t slot = layer.coded_begin[head]; slot < layer.coded_begin[head] + layer.coded_count[head]; ++slot)
          entries.push_back({layer.coded_positions[slot], coded_probabilities[slot], layer.coded_selected + slot});
      std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.position < b.position; });
      const int n = int(entries.size());
      std::vector<float> pooled(n);
      for (int i = 0; i < n; ++i) {
        pooled[i] = entries[i].probability;
        for (int k = i - 1; k >= 0 && entries[i].position - entries[k].position <= radius; --k)
          pooled[i] = std::max(pooled[i], entries[k].probability);
        for (int k = i + 1; k < n && entries[k].position - entries[i].position <= radius; ++k)
          pooled[i] = std::max(pooled[i], entries[k].probability);
      }
      std::vector<int> order(n);
      std::iota(order.begin(), order.end(), 0);
      const int keep = std::min(n, int(targets.selected[int64_t(j) * layer.kv_heads + h]));
      // Entries are in position order, so a higher index is the newer position.
      std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                        [&](int a, int b) { return pooled[a] != pooled[b] ? pooled[a] > pooled[b] : a > b; });
      for (const Entry& entry : entries) *entry.selected = 0;
      for (int i = 0; i < keep; ++i) *entries[order[i]].selected = 1;
    }
    state.refresh_position[sequence] = StepLength(step, j);
    state.steps_since_refresh[sequence] = 0;
    state.has_query[sequence] = 1;
    std::copy_n(state.step_query + int64_t(sequence) * layer.head_dim, layer.head_dim,
                state.query + int64_t(sequence) * layer.head_dim);
  }
}

void evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
           const StepTargets& targets, const EvictionSettings& settings) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j) {
    const int32_t length = StepLength(step, j);
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h);
      const int dense = layer.dense_count[head], coded = layer.coded_count ? layer.coded_count[head] : 0;
      int excess = dense + coded - targets.kept[int64_t(j) * layer.kv_heads + h];
      if (excess <= 0) continue;
      struct Candidate {
        bool coded;
        int index;  // in the head's region
        int32_t position;
        float score;
      };
      std::vector<Candidate> candidates;
      const int32_t protected_from = length - settings.protected_recent;
      auto consider = [&](bool is_coded, int index, int32_t position, float score) {
        if (position >= settings.sink_tokens && position < protected_from)
          candidates.push_back({is_coded, index, position, score});
      };
      for (int e = 0; e < coded; ++e) {
        const int64_t slot = layer.coded_begin[head] + e;
        consider(true, e, layer.coded_positions[slot], layer.coded_scores[slot]);
      }
      for (int e = 0; e < dense; ++e) {
        const int64_t slot = layer.dense_begin[head] + e;
        consider(false, e, layer.dense_positions[slot], layer.dense_scores[slot]);
      }
      excess = std::min(excess, int(candidates.size()));
      std::partial_sort(candidates.begin(), candidates.begin() + excess, candidates.end(),
                        [&](const Candidate& a, const Candidate& b) {
                          if (a.score != b.score)
                            return settings.keep_low_key_norms ? a.score > b.score : a.score < b.score;
                          return a.position < b.position;
                        });
      candidates.resize(excess);
      if (settings.merge_evicted) {
        std::sort(candidates.begin(), candidates.end(),
                  [](const Candidate& a, const Candidate& b) { return a.position < b.position; });
        std::vector<float> key(hd), value(hd);
        for (const Candidate& victim : candidates) {
          if (victim.coded) {
            DecodeCodedEntry(layer, *tables, h, layer.coded_begin[head] + victim.index, key.data(), value.data());
          } else {
            const int64_t slot = layer.dense_begin[head] + victim.index;
            for (int d = 0; d < hd; ++d) {
              key[d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
              value[d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
            }
          }
          merge_into_slot(key.data(), value.data(), 1, hd, layer.merged_keys + head * hd,
                          layer.merged_values + head * hd, layer.merged_tokens + head);
        }
      }
      std::vector<uint8_t> dense_removed(dense, 0), coded_removed(coded, 0);
      for (const Candidate& victim : candidates) (victim.coded ? coded_removed : dense_removed)[victim.index] = 1;
      CompactRegion(dense_removed, layer.dense_begin[head], layer.dense_count + head,
                    [&](int64_t from, int64_t to) { MoveDenseSlot(layer, from, to); });
      if (coded > 0)
        CompactRegion(coded_removed, layer.coded_begin[head], layer.coded_count + head,
                      [&](int64_t from, int64_t to) { MoveCodedSlot(layer, from, to); });
    }
  }
}

void gather_leaving_entries(const CompressedLayer& layer, const CodingTables& tables, const StepRowsView& step,
                            int coding_window, int max_leaving, float* keys, float* values, int32_t* leaving_slots,
                            int32_t* leaving_count) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j) {
    const int32_t leaves_before = StepLength(step, j) - coding_window;
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
      int count = 0;
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot) {
        if (layer.dense_positions[slot] >= leaves_before) continue;
        RequireSlot(count < max_leaving);
        const int64_t row = group * max_leaving + count++;
        leaving_slots[row] = int32_t(slot);
        float* key = keys + row * hd;
        for (int d = 0; d < hd; ++d) {
          key[d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
          values[row * hd + d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
        }
        if (!tables.keys_after_rope) {
          // Rotating by -position undoes RoPE; YaRN's magnitude factor is divided back out.
          const int32_t inverse = -layer.dense_positions[slot];
          apply_rope(key, &inverse, tables.inv_freq, 1, 1, hd, 1.0f);
          if (tables.rope_attention_factor != 1.0f)
            for (int d = 0; d < hd; ++d) key[d] /= tables.rope_attention_factor;
        }
      }
      leaving_count[group] = count;
    }
  }
}

void commit_leaving_entries(const CompressedLayer& layer, const StepRowsView& step, int max_leaving,
                            const int32_t* leaving_slots, const int32_t* leaving_count, const uint32_t* key_codes,
                            const uint32_t* value_codes) {
  const int sk = layer.key_sparsity, sv = layer.value_sparsity;
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
      const int64_t dense_base = layer.dense_begin[head];
      std::vector<uint8_t> removed(layer.dense_count[head], 0);
      for (int t = 0; t < leaving_count[group]; ++t) {
        const int64_t row = group * max_leaving + t, source = leaving_slots[row];
        const int64_t target = layer.coded_begin[head] + layer.coded_count[head]++;
        RequireSlot(target < layer.coded_begin[head + 1]);
        std::copy_n(key_codes + row * sk, sk, layer.key_codes + target * sk);
        std::copy_n(value_codes + row * sv, sv, layer.value_codes + target * sv);
        layer.coded_positions[target] = layer.dense_positions[source];
        if (layer.coded_scores) layer.coded_scores[target] = layer.dense_scores[source];
        if (layer.coded_selected) layer.coded_selected[target] = layer.dense_selected[source];
        removed[source - dense_base] = 1;
      }
      CompactRegion(removed, dense_base, layer.dense_count + head,
                    [&](int64_t from, int64_t to) { MoveDenseSlot(layer, from, to); });
    }
}

void fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill) {
  const int hd = layer.head_dim, sk = layer.key_sparsity, sv = layer.value_sparsity;
  for (int i = 0; i < layer.head_slots; ++i) {
    const int32_t length = fill.lengths[i / layer.kv_heads], dense = fill.dense[i];
    const int coded = layer.coded_count ? fill.coded[i] : 0;
    const int selected = fill.selected ? fill.selected[i] : 0;
    layer.dense_count[i] = dense;
    for (int e = 0; e < dense; ++e) {
      const int64_t slot = layer.dense_begin[i] + e;
      for (int d = 0; d < hd; ++d) {
        layer.dense_keys[slot * hd + d] = FloatToBf16(2.0f * NoiseValue(NoiseBits(fill.seed, 2 * (slot * hd + d))));
        layer.dense_values[slot * hd + d] = FloatToBf16(NoiseValue(NoiseBits(fill.seed, 2 * (slot * hd + d) + 1)));
      }
      layer.dense_positions[slot] = length - dense + e;
      if (layer.dense_scores) layer.dense_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 1, slot)) + 0.5f;
      if (layer.dense_selected) layer.dense_selected[slot] = e < selected;
    }
    if (layer.coded_count == nullptr) continue;
    layer.coded_count[i] = coded;
    for (int e = 0; e < coded; ++e) {
      const int64_t slot = layer.coded_begin[i] + e;
      for (int c = 0; c < sk + sv; ++c) {
        const uint32_t bits = NoiseBits(fill.seed ^ 2, slot * (sk + sv) + c);
        const uint32_t code = PackCode(uint16_t(bits % uint32_t(fill.atoms)), FloatToFp16(NoiseValue(bits)));
        if (c < sk)
          layer.key_codes[slot * sk + c] = code;
        else
          layer.value_codes[slot * sv + c - sk] = code;
      }
      layer.coded_positions[slot] = length - dense - coded + e;
      if (layer.coded_scores) layer.coded_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 3, slot)) + 0.5f;
      if (layer.coded_selected) layer.coded_selected[slot] = dense + e < selected;
    }
  }
  if (layer.merged_tokens == nullptr) return;
  for (int i = 0; i < layer.head_slots; ++i) {
    const int32_t kept = fill.dense[i] + (layer.coded_count ? fill.coded[i] : 0);
    layer.merged_tokens[i] = fill.merged[i] ? float(fill.lengths[i / layer.kv_heads] - kept) : 0.0f;
    for (int d = 0; d < hd; ++d) {
      layer.merged_keys[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 4, int64_t(i) * hd + d));
      layer.merged_values[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 5, int64_t(i) * hd + d));
    }
  }
}

}  // namespace kvplan::cpu
