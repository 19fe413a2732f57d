// Compressed layers made by hand for tests of the CPU references and of the CUDA kernels: regions of one capacity
// and helpers to fill them.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "base/number_formats.h"
#include "kernels/compressed_layout.h"
#include "runtime/cache/host_compressed_layer.h"

namespace kvplan::testing {

struct HostLayerShape {
  int head_slots = 1, kv_heads = 1, head_dim = 16;
  int key_sparsity = 0, value_sparsity = 0;    // 0: no coded region
  int dense_capacity = 0, coded_capacity = 0;  // per head slot
  bool scores = false, selected = false, merged = false;
};

// A layer whose head slots all own regions of the same capacity.
struct HostLayer : HostCompressedLayer {
  explicit HostLayer(const HostLayerShape& shape)
      : HostCompressedLayer(CompressedArrayShape{.head_slots = shape.head_slots,
                                                 .kv_heads = shape.kv_heads,
                                                 .head_dim = shape.head_dim,
                                                 .key_sparsity = shape.key_sparsity,
                                                 .value_sparsity = shape.value_sparsity,
                                                 .scores = shape.scores,
                                                 .selected = shape.selected,
                                                 .merged = shape.merged},
                            UniformRegions(shape.head_slots, shape.dense_capacity),
                            UniformRegions(shape.head_slots, shape.coded_capacity)) {}

  static std::vector<int32_t> UniformRegions(int head_slots, int capacity) {
    std::vector<int32_t> begin;
    for (int i = 0; i <= head_slots; ++i) begin.push_back(i * capacity);
    return begin;
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
