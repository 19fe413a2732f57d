// What the compressed-layer oracles (kernels/cpu/compressed/) share: finding a head's region, the step's length,
// decoding a coded entry, and keeping a region dense when entries leave it. Each oracle in this folder acts on the
// arrays of kernels/compressed_layout.h exactly as the CUDA kernel of the same name in kernels/cuda/compressed/
// does, down to which slot an entry lands in, so tests compare the storage exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// The head slot (sequence * kv_heads + kv_head) of KV head `kv_head` of the step's j-th sequence.
inline int64_t HeadSlot(const CompressedLayer& layer, const StepRowsView& step, int j, int kv_head) {
  return int64_t(step.sequence[j]) * layer.kv_heads + kv_head;
}

// The length of the step's j-th sequence after the step: its last row's position + 1.
inline int32_t StepLength(const StepRowsView& step, int j) { return step.row_position[step.row_begin[j + 1] - 1] + 1; }

// Host-side overflow of a region is a bug in the caller's sizing, never an input error: stop rather than corrupt.
inline void RequireSlot(bool fits) {
  if (!fits) std::abort();
}

// The key and value of coded entry `slot` of KV head `kv_head` as attention sees them: keys after RoPE.
void DecodeCodedEntry(const CompressedLayer& layer, const CodingTables& tables, int kv_head, int64_t slot, float* key,
                      float* value);

// Moves every per-slot array of a dense region (base = first slot of the head's region).
void MoveDenseSlot(const CompressedLayer& layer, int64_t from, int64_t to);
// Moves every per-slot array of a coded region.
void MoveCodedSlot(const CompressedLayer& layer, int64_t from, int64_t to);

// How a region of `live` slots stays dense when the marked ones are removed: with m = live - removed, the kept
// entries at or past m move, in slot order, into the removed slots below m, in slot order. Returns the moves as
// (from, to) slot pairs.
std::vector<std::pair<int, int>> CompactionMoves(const uint8_t* removed, int live);

// Removes the marked slots of a region starting at `base` with `*count` live slots.
template <typename Move>
void CompactRegion(const std::vector<uint8_t>& removed, int64_t base, int32_t* count, Move move) {
  for (const auto& [from, to] : CompactionMoves(removed.data(), *count)) move(base + from, base + to);
  *count -= int32_t(std::count(removed.begin(), removed.begin() + *count, uint8_t(1)));
}

}  // namespace kvplan::cpu
