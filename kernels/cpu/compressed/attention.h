// CPU oracle of attention over a compressed layer (kernels/cuda/compressed/attention.cu): the CUDA general and
// split paths and the entry probabilities all agree with this one function.
#pragma once

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

struct CompressedAttentionParams {
  int heads = 0;  // query heads; heads / kv_heads share a KV head
  float scale = 1.0f;
  float merge_compensation = 0.0f;  // a merged slot's logit bias is this * log(tokens it holds)
};

// Attention of the step's rows ([rows, heads, head_dim] queries after RoPE) over their sequences' compressed
// heads. A row sees a coded or dense entry whose position is not after its own; with `refresh` non-null and the
// sequence not on a full step, only if the entry is selected or at or after the sequence's refresh_position. The
// merged slot, once it holds tokens, is seen by every row. out: [rows, heads, head_dim].
// With dense_probabilities / coded_probabilities non-null ([dense slots] / [coded slots]), every live entry of a
// stepping head receives its softmax probability maxed over the sequence's rows and the group's query heads (0
// when no row sees it): the signal attention-scored budgets and RefreshKV selection use.
void compressed_attention(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
                          const RefreshStateView* refresh, const CompressedAttentionParams& params, const float* q,
                          float* out, float* dense_probabilities, float* coded_probabilities);

}  // namespace kvplan::cpu
