// A compressed layer's arrays (kernels/compressed_layout.h) in host vectors, for tests of the CPU references and
// of the CUDA kernels (which copy them to the device and back).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "base/number_formats.h"
#include "kernels/compressed_layout.h"

namespace kvplan::testing {

struct HostLayerShape {
  int head_slots = 1, kv_heads = 1, head_dim = 16;
  int key_sparsity = 0, value_sparsity = 0;    // 0: no coded region
  int dense_capacity = 0, coded_capacity = 0;  // per head slot
  bool scores = false, selected = false, merged = false;
};

struct HostLayer {
  explicit HostLayer(const HostLayerShape& shape) : shape(shape) {
    const int n = shape.head_slots, hd = shape.head_dim;
    for (int i = 0; i <= n; ++i) {
      dense_begin.push_back(i * shape.dense_capacity);
      coded_begin.push_back(i * shape.coded_capacity);
    }
    const int64_t dense = int64_t(n) * shape.dense_capacity, coded = int64_t(n) * shape.coded_capacity;
    dense_count.assign(n, 0);
    dense_keys.assign(dense * hd, 0);
    dense_values.assign(dense * hd, 0);
    dense_positions.assign(dense, -1);
    if (shape.scores) dense_scores.assign(dense, 0.0f);
    if (shape.selected) dense_selected.assign(dense, 0);
    if (shape.key_sparsity > 0) {
      coded_count.assign(n, 0);
      key_codes.assign(coded * shape.key_sparsity, 0);
      value_codes.assign(coded * shape.value_sparsity, 0);
      coded_positions.assign(coded, -1);
      if (shape.scores) coded_scores.assign(coded, 0.0f);
      if (shape.selected) coded_selected.assign(coded, 0);
    }
    if (shape.merged) {
      merged_keys.assign(int64_t(n) * hd, 0.0f);
      merged_values.assign(int64_t(n) * hd, 0.0f);
      merged_tokens.assign(n, 0.0f);
    }
  }

  CompressedLayer View() {
    auto data = [](auto& values) { return values.empty() ? nullptr : values.data(); };
    return CompressedLayer{.head_slots = shape.head_slots,
                           .kv_heads = shape.kv_heads,
                           .head_dim = shape.head_dim,
                           .key_sparsity = shape.key_sparsity,
                           .value_sparsity = shape.value_sparsity,
                           .dense_begin = dense_begin.data(),
                           .dense_count = dense_count.data(),
                           .dense_keys = dense_keys.data(),
                           .dense_values = dense_values.data(),
                           .dense_positions = dense_positions.data(),
                           .dense_scores = data(dense_scores),
                           .dense_selected = data(dense_selected),
                           .coded_begin = coded_begin.data(),
                           .coded_count = data(coded_count),
                           .key_codes = data(key_codes),
                           .value_codes = data(value_codes),
                           .coded_positions = data(coded_positions),
                           .coded_scores = data(coded_scores),
                           .coded_selected = data(coded_selected),
                           .merged_keys = data(merged_keys),
                           .merged_values = data(merged_values),
                           .merged_tokens = data(merged_tokens)};
  }

  // Adds a dense entry to head slot i with the given position and score and random bf16 K/V.
  void AddDense(int i, int32_t position, float score, std::mt19937& generator) {
    std::normal_distribution<float> normal;
    const int64_t slot = dense_begin[i] + dense_count[i]++;
    for (int d = 0; d < shape.head_dim; ++d) {
      dense_keys[slot * shape.head_dim + d] = FloatToBf16(normal(generator));
      dense_values[slot * shape.head_dim + d] = FloatToBf16(normal(generator));
    }
    dense_positions[slot] = position;
    if (shape.scores) dense_scores[slot] = score;
  }

  // Adds a coded entry with random codes over `atoms` atoms and fp16 coefficients.
  void AddCoded(int i, int32_t position, float score, int atoms, std::mt19937& generator) {
    std::normal_distribution<float> normal;
    const int64_t slot = coded_begin[i] + coded_count[i]++;
    for (int s = 0; s < shape.key_sparsity; ++s)
      key_codes[slot * shape.key_sparsity + s] =
          PackCode(uint16_t(generator() % atoms), FloatToFp16(normal(generator)));
    for (int s = 0; s < shape.value_sparsity; ++s)
      value_codes[slot * shape.value_sparsity + s] =
          PackCode(uint16_t(generator() % atoms), FloatToFp16(normal(generator)));
    coded_positions[slot] = position;
    if (shape.scores) coded_scores[slot] = score;
  }

  // Positions of head slot i's live dense entries, in slot order.
  std::vector<int32_t> DensePositions(int i) const {
    return {dense_positions.begin() + dense_begin[i], dense_positions.begin() + dense_begin[i] + dense_count[i]};
  }
  std::vector<int32_t> CodedPositions(int i) const {
    return {coded_positions.begin() + coded_begin[i], coded_positions.begin() + coded_begin[i] + coded_count[i]};
  }

  HostLayerShape shape;
  std::vector<int32_t> dense_begin, coded_begin, dense_count, coded_count;
  std::vector<uint16_t> dense_keys, dense_values;
  std::vector<int32_t> dense_positions, coded_positions;
  std::vector<float> dense_scores, coded_scores;
  std::vector<uint8_t> dense_selected, coded_selected;
  std::vector<uint32_t> key_codes, value_codes;
  std::vector<float> merged_keys, merged_values, merged_tokens;
};

// A step of one row per listed sequence (decode), or of `rows` rows of sequence 0 ending at `last_position`.
struct HostStep {
  std::vector<int32_t> row_sequence, row_position, sequence, row_begin;
  StepRowsView View() const {
    return StepRowsView{.rows = int(row_sequence.size()),
                        .row_sequence = row_sequence.data(),
                        .row_position = row_position.data(),
                        .sequences = int(sequence.size()),
                        .sequence = sequence.data(),
                        .row_begin = row_begin.data()};
  }
  // Appends `rows` consecutive rows of `cache_sequence` ending at last_position as the next step sequence.
  void AddSequence(int cache_sequence, int rows, int32_t last_position) {
    if (row_begin.empty()) row_begin.push_back(0);
    sequence.push_back(cache_sequence);
    for (int r = 0; r < rows; ++r) {
      row_sequence.push_back(cache_sequence);
      row_position.push_back(last_position - rows + 1 + r);
    }
    row_begin.push_back(int32_t(row_sequence.size()));
  }
};

}  // namespace kvplan::testing
