// CPU oracle of the eviction kernel (kernels/cuda/compressed/eviction.cu): token budgets with ZeroMerge merging,
// acting on the arrays of kernels/compressed_layout.h as the CUDA kernel of the same name does.
#pragma once

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// Token budgets: each stepping head removes live entries until targets.kept remain, taking only candidates
// (neither among the first sink_tokens positions nor among the protected_recent newest), the highest key norms
// (keep_low_key_norms) or the lowest scores first, older first on ties. With merge_evicted, the victims' keys
// (after RoPE; coded ones decoded, and rotated when coded before RoPE) and values are folded, in position order,
// into the head's merged slot. Dense and coded regions are then compacted (CompactionMoves).
void evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
           const StepTargets& targets, const EvictionSettings& settings);

// ZeroMerge: folds `count` victims ([count, head_dim] keys and values, in order) into a residual slot holding the
// running mean of `*slot_tokens` tokens; *slot_tokens grows by count.
void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens);

}  // namespace kvplan::cpu
