// What the CPU and CUDA compressed caches share on the host: how large each head's regions of the layer arrays
// (kernels/compressed_layout.h) are, how a step's rows group by sequence, the entry counts the cache policy fixes
// for each step, and the order a layer's operations run in. Storage and kernels differ per backend; these do not.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "base/status_macros.h"
#include "kernels/compressed_layout.h"
#include "plans/cache_policy.h"
#include "runtime/cache/host_compressed_layer.h"

namespace kvplan {

// Region bounds of one compressed layer: head slot i = sequence * kv_heads + kv_head owns dense slots
// [dense_begin[i], dense_begin[i + 1]) and coded slots likewise. A head never holds more than its kept tokens plus
// the rows one step appends (before eviction and coding catch up), so that is what it gets.
struct CompressedRegions {
  std::vector<int32_t> dense_begin;  // [head_slots + 1]
  std::vector<int32_t> coded_begin;  // [head_slots + 1]; all zero when the layer codes nothing
  int64_t dense_slots() const { return dense_begin.back(); }
  int64_t coded_slots() const { return coded_begin.back(); }
};
// max_step_rows: the most rows one step appends to one sequence (the runtimes' chunk).
CompressedRegions PlanRegions(const LayerPolicy& policy, int num_sequences, int kv_heads, int capacity,
                              int max_step_rows);

// The arrays a layer of `policy` keeps for num_sequences sequences: codes with CSR, scores with budgets, selection
// flags with RefreshKV, a merged slot with ZeroMerge.
CompressedArrayShape ArrayShapeOf(const LayerPolicy& policy, int num_sequences, int kv_heads, int head_dim);

// A step's rows grouped by sequence, as host arrays behind a StepRowsView.
struct StepGroups {
  std::vector<int32_t> sequence;   // [groups]
  std::vector<int32_t> row_begin;  // [groups + 1]
  std::vector<int32_t> length;     // [groups]: the sequence's length after the step
  int max_rows = 0;                // most rows of one group
};
// Rows of one sequence must be consecutive (ValidateStepRows checks it).
StepGroups GroupRows(const int32_t* row_sequence, const int32_t* row_position, int rows);
StepRowsView ViewOf(const StepGroups& groups, const int32_t* row_sequence, const int32_t* row_position, int rows);

// The counts StepTargets points at, for each group and KV head of a step: plain entries kept after eviction and
// entries a RefreshKV full step selects.
struct StepCounts {
  std::vector<int32_t> kept;
  std::vector<int32_t> selected;
};
StepCounts CountsForStep(const LayerPolicy& policy, int kv_heads, const StepGroups& groups);

// The kernel-level settings of a layer's policy.
EvictionSettings EvictionSettingsOf(const LayerPolicy& policy);
RefreshSettings RefreshSettingsOf(const RefreshPolicy& refresh);
// Whether the attention must report entry probabilities: attention-scored budgets, or RefreshKV (its full steps
// select from them).
bool NeedsProbabilities(const LayerPolicy& policy);

// Eviction, then coding: what a step leaves once attention is done (also how noise fills a cache for benchmarks).
template <typename Ops>
absl::Status Compress(const LayerPolicy& policy, Ops& ops) {
  if (policy.budget) KVPLAN_RETURN_IF_ERROR(ops.Evict());
  if (policy.coding) KVPLAN_RETURN_IF_ERROR(ops.CodeLeaving());
  return absl::OkStatus();
}

// The order a compressed layer's operations run in, after the step's rows were appended: decide RefreshKV, attend
// (with probabilities where scores or selections need them), score, select, evict, code what left the window.
// Ops provides each operation for one backend, returning absl::Status.
template <typename Ops>
absl::Status AttendAndCompress(const LayerPolicy& policy, Ops& ops) {
  if (policy.refresh) KVPLAN_RETURN_IF_ERROR(ops.DecideRefresh());
  KVPLAN_RETURN_IF_ERROR(ops.Attend(NeedsProbabilities(policy)));
  if (policy.budget && policy.budget->scoring == plan::TokenBudgets::ATTENTION_SCORE)
    KVPLAN_RETURN_IF_ERROR(ops.UpdateScores());
  if (policy.refresh) KVPLAN_RETURN_IF_ERROR(ops.SelectRefresh());
  return Compress(policy, ops);
}

}  // namespace kvplan
