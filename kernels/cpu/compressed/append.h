// CPU oracles of the append kernels (kernels/cuda/compressed/append.cu), acting on the arrays of
// kernels/compressed_layout.h as the CUDA kernels of the same name do.
#pragma once

#include <cstdint>

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// Appends every row's keys (after RoPE) and values ([rows, kv_heads, head_dim]) as bf16 dense entries of its
// head, in row order, at the end of the head's live slots. key_norms ([rows, kv_heads], nullable) become the
// entries' scores (0 without), and the entries start unselected.
void compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys, const float* values,
                       const float* key_norms);

// Eviction scoring: norms[i] = ||keys[i, :]||. L2-norm eviction keeps the lowest-norm keys.
void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms);

}  // namespace kvplan::cpu
