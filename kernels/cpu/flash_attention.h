// CPU oracle of the tensor-core prefill attention (kernels/cuda/flash_attention.cu): attention over the full cache
// of a query rounded to bf16, as the kernel's MMAs read it.
#pragma once

#include <cstdint>

#include "kernels/cpu/attention.h"

namespace kvplan::cpu {

// cpu::attention with every query element rounded to bf16 (round to nearest even) first.
void flash_attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
                     int kv_heads, int head_dim, float scale, int sliding_window, float* out);

}  // namespace kvplan::cpu
