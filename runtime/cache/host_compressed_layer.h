// A compressed layer's arrays (kernels/compressed_arrays.h) and its RefreshKV state in host vectors: the CPU
// runtime's storage, and what kernel tests build layers from (the CUDA tests copy them to the device and back).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/compressed_layout.h"

namespace kvplan {

template <typename T>
using HostArray = std::vector<T>;

template <typename T>
T* DataOrNull(std::vector<T>& values) {
  return values.empty() ? nullptr : values.data();
}

struct HostCompressedLayer : CompressedArrays<HostArray> {
  // Region bounds as CompressedRegions holds them ([head_slots + 1] each); every other array the shape keeps
  // starts zeroed, the others empty.
  HostCompressedLayer(const CompressedArrayShape& shape, std::vector<int32_t> dense_bounds,
                      std::vector<int32_t> coded_bounds)
      : shape(shape) {
    dense_begin = std::move(dense_bounds);
    coded_begin = std::move(coded_bounds);
    const int64_t dense_slots = dense_begin.back(), coded_slots = coded_begin.back();
    ForEachArray(
        [&](const ArraySpec& spec, auto& values) {
          if (!spec.is_bounds()) values.assign(size_t(ArrayElements(spec, shape, dense_slots, coded_slots)), {});
        },
        *this);
  }

  // Pointers into the vectors: valid while none of them is resized.
  CompressedLayer View() {
    return LayerView(shape, *this, [](auto& values) { return DataOrNull(values); });
  }
  RefreshStateView RefreshView() {
    return kvplan::RefreshView(*this, [](auto& values) { return DataOrNull(values); });
  }

  // Forgets sequences [first, end): zeroes their rows of the arrays a reset clears (layout::kZeroed). Those hold
  // the same number of values per sequence, sequence-major.
  void ResetSequences(int first, int end) {
    const int sequences = shape.head_slots / shape.kv_heads;
    ForEachArray(
        [&](const ArraySpec& spec, auto& values) {
          if (spec.reset != layout::kZeroed) return;
          const int64_t per_sequence = int64_t(values.size()) / sequences;
          std::fill(values.begin() + first * per_sequence, values.begin() + end * per_sequence, 0);
        },
        *this);
  }

  CompressedArrayShape shape;
};

}  // namespace kvplan
