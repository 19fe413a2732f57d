// A compressed layer's arrays (kernels/compressed_layout.h) in host vectors: the CPU runtime's storage, and what
// kernel tests build layers from (the CUDA tests copy them to the device and back).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/compressed_layout.h"

namespace kvplan {

// Which arrays a compressed layer keeps, beside the dense entries every one has.
struct CompressedArrayShape {
  int head_slots = 1, kv_heads = 1, head_dim = 16;
  int key_sparsity = 0, value_sparsity = 0;  // 0: no coded region
  bool scores = false, selected = false, merged = false;
};

struct HostCompressedLayer {
  // Region bounds as CompressedRegions holds them ([head_slots + 1] each); every array starts zeroed.
  HostCompressedLayer(const CompressedArrayShape& shape, std::vector<int32_t> dense_begin,
                      std::vector<int32_t> coded_begin)
      : shape(shape), dense_begin(std::move(dense_begin)), coded_begin(std::move(coded_begin)) {
    const int n = shape.head_slots, hd = shape.head_dim;
    const int64_t dense = this->dense_begin.back(), coded = this->coded_begin.back();
    dense_count.assign(n, 0);
    dense_keys.assign(dense * hd, 0);
    dense_values.assign(dense * hd, 0);
    dense_positions.assign(dense, 0);
    if (shape.scores) dense_scores.assign(dense, 0.0f);
    if (shape.selected) dense_selected.assign(dense, 0);
    if (shape.key_sparsity > 0) {
      coded_count.assign(n, 0);
      key_codes.assign(coded * shape.key_sparsity, 0);
      value_codes.assign(coded * shape.value_sparsity, 0);
      coded_positions.assign(coded, 0);
      if (shape.scores) coded_scores.assign(coded, 0.0f);
      if (shape.selected) coded_selected.assign(coded, 0);
    }
    if (shape.merged) {
      merged_keys.assign(int64_t(n) * hd, 0.0f);
      merged_values.assign(int64_t(n) * hd, 0.0f);
      merged_tokens.assign(n, 0.0f);
    }
  }

  // Pointers into the vectors: valid while none of them is resized.
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

  CompressedArrayShape shape;
  std::vector<int32_t> dense_begin, coded_begin, dense_count, coded_count;
  std::vector<uint16_t> dense_keys, dense_values;
  std::vector<int32_t> dense_positions, coded_positions;
  std::vector<float> dense_scores, coded_scores;
  std::vector<uint8_t> dense_selected, coded_selected;
  std::vector<uint32_t> key_codes, value_codes;
  std::vector<float> merged_keys, merged_values, merged_tokens;
};

}  // namespace kvplan
