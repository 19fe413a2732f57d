// Split-KV (flash-decoding) counts and the layout of the per-split partial softmax states: plain C++, so the host
// schedulers (compressed/attention_schedule.cc) and the kernels (through split_kv.cuh) share one definition.
#pragma once

#include <cstdint>

namespace kvplan::cuda {

inline constexpr int kMinChunk = 64;        // cache entries per split, at least
inline constexpr int kTargetBlocks = 1024;  // enough blocks in flight to saturate HBM on an H100 (132 SMs)

// Partial softmax state of one split: running max, running sum and unnormalised output per head.
struct PartialView {
  float* max;  // [rows, heads, splits]
  float* sum;  // [rows, heads, splits]
  float* acc;  // [rows, heads, splits, head_dim]
};

inline int split_count(int rows, int kv_heads, int max_entries) {
  const int wanted = (kTargetBlocks + rows * kv_heads - 1) / (rows * kv_heads);
  const int most = (max_entries + kMinChunk - 1) / kMinChunk;
  return wanted < most ? (wanted > 1 ? wanted : 1) : (most > 1 ? most : 1);
}

inline PartialView partial_view(void* workspace, int rows, int heads, int splits) {
  float* base = static_cast<float*>(workspace);
  const int64_t slots = int64_t(rows) * heads * splits;
  return PartialView{base, base + slots, base + 2 * slots};
}

}  // namespace kvplan::cuda
