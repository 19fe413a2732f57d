#include "kernels/cuda/compressed/attention_schedule.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/split_kv.h"

namespace kvplan::cuda {

using namespace compressed_launch;

namespace {

// The general kernel's splits per (row, KV head).
int compressed_splits(int rows, int kv_heads, int max_region) { return split_count(rows, kv_heads, max_region); }

// Splits per (row, KV head) on the split path: as many as one wave of resident blocks holds, no more than max_region
// allows at the least work per split (all dense, the worst case), at most kMaxSplits.
int split_path_splits(int sms, int rows, int kv_heads, int group, int max_region) {
  const int wave = sms * split_blocks_per_sm(group_width(group));
  const int wanted = std::max(1, wave / (rows * kv_heads));
  const int dense_per_split = kSplitWork / kDenseEntryWork;
  const int most = std::min(kMaxSplits, std::max(1, (max_region + dense_per_split - 1) / dense_per_split));
  return std::min(wanted, most);
}

size_t general_workspace_bytes(int rows, int heads, int head_dim, int splits) {
  return size_t(int64_t(rows) * splits * heads) * (2 + head_dim) * sizeof(float);
}

// Whether a layer takes the split path, and with which reader: uncoded and quantized layers always; dictionary coded
// ones when their keys were coded after RoPE, their sparsities are multiples of 4 up to 16, and the group's table and
// atom weights fit in shared memory beside the merge area.
void choose_path(const CompressedLayer& layer, const CodingTables* tables, const DeviceLimits& device,
                 CompressedAttentionPlan& plan) {
  const bool coded = layer.coded_count != nullptr && layer.key_sparsity > 0;
  const int width = group_width(plan.group);
  const size_t uncoded_bytes = split_shared_layout(layer.head_dim, width, 0, false, 0).floats * sizeof(float);
  plan.shared_bytes = uncoded_bytes;
  if (!coded) {
    plan.path = AttentionPath::kSplitDense;
    return;
  }
  if (tables != nullptr && tables->key_bits > 0) {
    plan.path = AttentionPath::kSplitQuantized;
    const int stage_words = quantized_stage_words(layer.head_dim, layer.key_sparsity, layer.value_sparsity);
    const size_t bytes = split_shared_layout(layer.head_dim, width, 0, false, stage_words).floats * sizeof(float);
    if (bytes > size_t(device.shared_bytes_per_block_optin)) {  // a device with little shared memory per block
      plan.path = AttentionPath::kGeneral;
      plan.shared_bytes = 0;
      return;
    }
    plan.shared_bytes = bytes;
    return;
  }
  plan.shared_bytes = 0;
  const int most_codes = std::max(layer.key_sparsity, layer.value_sparsity);
  if (tables == nullptr || !tables->keys_after_rope || layer.key_sparsity % 4 != 0 || layer.value_sparsity % 4 != 0 ||
      most_codes > 16)
    return;
  const size_t bytes = split_shared_layout(layer.head_dim, width, tables->atoms, true, 0).floats * sizeof(float);
  if (bytes > size_t(device.shared_bytes_per_block_optin)) return;
  plan.path = AttentionPath::kSplitCodedAfterRope;
  plan.max_codes = most_codes <= 8 ? 8 : 16;
  plan.atoms = tables->atoms;
  plan.shared_bytes = bytes;
}

}  // namespace

bool compressed_attention_supported(int heads, int kv_heads, int head_dim) {
  return (head_dim == 64 || head_dim == 128 || head_dim == 256) && kv_heads > 0 && heads % kv_heads == 0 &&
         heads / kv_heads <= kMaxGroup;
}

int multiprocessors() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

DeviceLimits device_limits() {
  DeviceLimits limits;
  limits.multiprocessors = multiprocessors();
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess)
    limits.shared_bytes_per_block_optin = optin;
  return limits;
}

SplitWorkspaceLayout split_workspace_layout(int rows, int heads, int kv_heads, int head_dim, int atoms, int splits) {
  const int width = group_width(heads / kv_heads), atom_chunks = (atoms + kCombineAtoms - 1) / kCombineAtoms;
  SplitWorkspaceLayout layout;
  layout.table_stride = round_up_4(width * atoms);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t start = offset;
    offset += (bytes + 15) / 16 * 16;
    return start;
  };
  const int64_t slots = int64_t(rows) * heads * splits;
  layout.partial = take(slots * (2 + head_dim) * sizeof(float));
  if (atoms > 0) {
    layout.table = take(int64_t(rows) * kv_heads * layout.table_stride * sizeof(float));
    layout.weights = take(slots * atoms * sizeof(float));
    layout.combine_partials = take(int64_t(rows) * heads * (atom_chunks + 1) * head_dim * sizeof(float));
    layout.combined_blocks = take(int64_t(rows) * kv_heads * sizeof(int32_t));
  }
  layout.bytes = offset;
  return layout;
}

CompressedAttentionPlan plan_compressed_attention(const CompressedLayer& layer, const CodingTables* tables,
                                                  const CompressedAttentionShape& shape, int rows,
                                                  const DeviceLimits& device) {
  CompressedAttentionPlan plan;
  plan.rows = rows;
  if (rows <= 0 || !compressed_attention_supported(shape.heads, layer.kv_heads, layer.head_dim)) return plan;
  const int kv_heads = layer.kv_heads, head_dim = layer.head_dim;
  plan.group = shape.heads / kv_heads;
  plan.general_splits = compressed_splits(rows, kv_heads, shape.max_region);
  choose_path(layer, tables, device, plan);
  if (plan.path == AttentionPath::kGeneral) {
    plan.workspace_bytes = general_workspace_bytes(rows, shape.heads, head_dim, plan.general_splits);
    return plan;
  }
  // Launches that carry the table and atom weights take at most kRowsPerTableLaunch rows each.
  auto launch = [&](int launch_rows) {
    SplitLaunchPlan planned;
    planned.rows = launch_rows;
    planned.splits = split_path_splits(device.multiprocessors, launch_rows, kv_heads, plan.group, shape.max_region);
    planned.workspace =
        split_workspace_layout(launch_rows, shape.heads, kv_heads, head_dim, plan.atoms, planned.splits);
    return planned;
  };
  const int rows_per_launch = plan.atoms > 0 ? std::min(rows, kRowsPerTableLaunch) : rows;
  plan.full_launches = rows / rows_per_launch;
  plan.full = launch(rows_per_launch);
  if (rows % rows_per_launch > 0) plan.rest = launch(rows % rows_per_launch);
  plan.workspace_bytes = std::max(plan.full.workspace.bytes, plan.rest.workspace.bytes);
  return plan;
}

size_t compressed_attention_workspace_bytes(const CompressedAttentionShape& shape, int rows, int kv_heads, int head_dim,
                                            int atoms, const DeviceLimits& device) {
  // Whichever path the layer takes: the general kernel's r rows take r * splits partial states per query head; the
  // split path's launches hold at most kRowsPerTableLaunch rows when they carry atom tables and weights.
  const int group = shape.heads / kv_heads;
  size_t bytes = 0;
  for (int r = 1; r <= rows; ++r) {
    bytes = std::max(bytes,
                     general_workspace_bytes(r, shape.heads, head_dim, compressed_splits(r, kv_heads, shape.max_region)));
    const int splits = split_path_splits(device.multiprocessors, r, kv_heads, group, shape.max_region);
    bytes = std::max(bytes, split_workspace_layout(r, shape.heads, kv_heads, head_dim, 0, splits).bytes);
    if (atoms > 0 && r <= kRowsPerTableLaunch)
      bytes = std::max(bytes, split_workspace_layout(r, shape.heads, kv_heads, head_dim, atoms, splits).bytes);
  }
  return bytes;
}

}  // namespace kvplan::cuda
