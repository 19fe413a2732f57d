#include "kernels/cpu/flash_attention.h"

#include <algorithm>
#include <vector>

#include "base/number_formats.h"

namespace kvplan::cpu {

void flash_attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
                     int kv_heads, int head_dim, float scale, int sliding_window, float* out) {
  std::vector<float> rounded(q, q + int64_t(tokens) * heads * head_dim);
  std::transform(rounded.begin(), rounded.end(), rounded.begin(), [](float x) { return RoundToBf16(x); });
  attention(rounded.data(), query_positions, tokens, heads, kv, kv_heads, head_dim, scale, sliding_window, out);
}

}  // namespace kvplan::cpu
