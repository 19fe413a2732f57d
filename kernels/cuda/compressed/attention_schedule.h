// Host-side scheduling of compressed_attention, FlashInfer's plan/run split: plan_compressed_attention decides once
// per pass and layer which kernels run (the general kernel, or the split path with the reader of the layer's coded
// region), how many splits each launch takes and where its arrays sit in the workspace; compressed_attention
// (kernels.h) then only launches what the plan says. Plain C++: the constants and the split kernel's shared-memory
// layout below are read by the kernels (attention.cu) too, so the host and the device size things one way.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/compressed_layout.h"

namespace kvplan::cuda {

struct CompressedAttentionShape {
  int heads = 0;  // query heads
  float scale = 1.0f;
  float merge_compensation = 0.0f;
  int max_region = 0;  // most entries (dense + coded + merged) a head slot can hold
};
bool compressed_attention_supported(int heads, int kv_heads, int head_dim);

// What the plans need to know of the device, queried once by the caller (device_limits: the current device's).
struct DeviceLimits {
  int multiprocessors = 132;
  int shared_bytes_per_block_optin = 0;  // 0 when unknown: layers coded after RoPE then take the general kernel
};
DeviceLimits device_limits();
int multiprocessors();  // of the current device (132 when it cannot be asked)

// --- The compressed kernels' constants (bench/coded_attention_tuning.md has the measurements behind them) ---------
// In a namespace of their own, as kernels.h makes this header public and the dense attention has names of its own;
// the compressed kernels' files use them unqualified (`using namespace compressed_launch;`).
namespace compressed_launch {

inline constexpr int kMaxGroup = 8;  // most query heads per KV head
inline constexpr int kSplitWarps = 8;
inline constexpr int kSplitThreads = kSplitWarps * 32;
// A dense entry reads 512 bytes at head_dim 128 and a coded one about 70 (codes and position) plus its shared-memory
// gathers, so for sizing splits a dense entry counts as kDenseEntryWork coded ones. A split takes at least kSplitWork:
// 64 dense entries, as the dense kernel's chunks, or 512 coded ones, so that the per-split atom weights it leaves for
// the combine (group * atoms floats) stay small next to the codes it read. (Against 1024, 512 took 4K from 34.2 to
// 29.5 us and left 32K alone, where the wave bounds the splits; 256 measured no better.)
inline constexpr int kDenseEntryWork = 8;
inline constexpr int kSplitWork = 512;
inline constexpr int kMaxSplits = 256;          // bounds the combine's per-split factors in shared memory
inline constexpr int kRowsPerTableLaunch = 32;  // bounds the table and weights in the workspace for prefill-sized steps
inline constexpr int kTableTile = 32;           // atoms, and query vectors, per block of the table kernel
inline constexpr int kCombineAtoms = 64;        // value atoms per combine block

// Group sizes the kernels are built for: the GQA group rounded up to 1, 2, 4 or 8 query heads.
KVPLAN_HOST_DEVICE constexpr int group_width(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kMaxGroup;
}
// Two blocks per SM where the group's query and accumulator registers allow (at most 128 per thread), else one.
KVPLAN_HOST_DEVICE constexpr int split_blocks_per_sm(int group_width) { return group_width <= 4 ? 2 : 1; }
KVPLAN_HOST_DEVICE constexpr int round_up_4(int n) { return (n + 3) / 4 * 4; }

// The quantized reader stages its entries per warp in chunks of 8 entries per lane group (8 * 256 / head_dim), two
// chunks at a time: a chunk's codes (key_sparsity and value_sparsity words per entry) and positions, in 4-byte words.
KVPLAN_HOST_DEVICE constexpr int quantized_chunk_entries(int head_dim) { return 8 * 256 / head_dim; }
KVPLAN_HOST_DEVICE constexpr int quantized_chunk_words(int head_dim, int key_sparsity, int value_sparsity) {
  return quantized_chunk_entries(head_dim) * (key_sparsity + value_sparsity + 1);
}
KVPLAN_HOST_DEVICE constexpr int quantized_stage_words(int head_dim, int key_sparsity, int value_sparsity) {
  return 2 * quantized_chunk_words(head_dim, key_sparsity, value_sparsity);
}

// The split kernel's dynamic shared memory, in 4-byte words: the query-atom table for the group (reused for the
// warps' softmax states once the coded pass is done), the atom weights, each warp's per-tile maxima and coefficient
// sum (two tiles' worth, by parity), the per-warp coded sums, and each warp's stage_words of staged entries. Only the
// reader of codes after RoPE stages the table and the weights (`coded`); only the quantized reader stages entries.
struct SplitSharedLayout {
  int weights, tile_stats, coded_sums, stages, stage_words, floats;
};
KVPLAN_HOST_DEVICE inline SplitSharedLayout split_shared_layout(int head_dim, int width, int atoms, bool coded,
                                                                int stage_words) {
  const int states = kSplitWarps * width * (head_dim + 2);  // WarpSoftmaxStates<kSplitWarps, width, head_dim>
  const int table = coded ? round_up_4(width * atoms) : 0;
  SplitSharedLayout layout;
  layout.weights = round_up_4(states > table ? states : table);
  layout.tile_stats = layout.weights + (coded ? round_up_4(width * atoms) : 0);
  layout.coded_sums = layout.tile_stats + 2 * kSplitWarps * (width + 1);
  layout.stages = round_up_4(layout.coded_sums + kSplitWarps * width);
  layout.stage_words = stage_words;
  layout.floats = layout.stages + kSplitWarps * stage_words;
  return layout;
}

}  // namespace compressed_launch

// --- Plans ---------------------------------------------------------------------------------------------------------

// Where one launch of the split path keeps its arrays in the workspace: byte offsets from its start, 16-byte aligned.
// The table, weights and combine arrays exist only when the launch carries atoms.
struct SplitWorkspaceLayout {
  size_t partial = 0;           // the splits' partial states (split_kv.h's PartialView)
  size_t table = 0;             // [rows, kv_heads, table_stride]: the query-atom table, group_width values per atom
  int table_stride = 0;         // floats per (row, KV head) of the table
  size_t weights = 0;           // [rows, heads, splits, atoms]: each split's softmax weight per value atom
  size_t combine_partials = 0;  // [rows, heads, atom chunks + 1, head_dim]: the combine blocks' shares of the output
  size_t combined_blocks = 0;   // [rows, kv_heads] int32: combine blocks finished, so the last one writes the output
  size_t bytes = 0;
};
SplitWorkspaceLayout split_workspace_layout(int rows, int heads, int kv_heads, int head_dim, int atoms, int splits);

// The kernels that run a layer's attention. The split path reads the dense region in bf16 tiles and the coded region
// with the reader of its format (entry_readers.cuh); the general kernel rebuilds every entry in every lane and takes
// the layers the split path cannot: keys coded before RoPE, sparsities that are no multiple of 4 or above 16, and a
// table and atom weights too large for shared memory.
enum class AttentionPath {
  kGeneral,
  kSplitDense,           // no coded region
  kSplitQuantized,       // int8/4/2 quantized coded entries
  kSplitCodedAfterRope,  // dictionary codes of keys after RoPE, through the query-atom table
};

// One launch chain of the split path (table, split kernel, combine) over `rows` consecutive rows of the step.
struct SplitLaunchPlan {
  int rows = 0;
  int splits = 0;  // per (row, KV head)
  SplitWorkspaceLayout workspace;
};

struct CompressedAttentionPlan {
  AttentionPath path = AttentionPath::kGeneral;
  int rows = 0;            // the step's rows: a plan is for steps of exactly this many
  int group = 0;           // query heads per KV head
  int general_splits = 0;  // the general kernel's splits per (row, KV head)
  // The split path: the codes per entry the coded reader is built for (8 or 16, codes after RoPE only), the atoms the
  // launches carry (the table and weights; 0 unless codes after RoPE), the split kernel's dynamic shared memory, and
  // its launches in order: full_launches of `full`, then `rest` when rest.rows > 0.
  int max_codes = 0;
  int atoms = 0;
  size_t shared_bytes = 0;
  int full_launches = 0;
  SplitLaunchPlan full, rest;
  size_t workspace_bytes = 0;  // what this plan's launches use of the workspace
};

// The plan for a step of `rows` rows of a layer (tables: null for a layer that codes nothing). Launch shapes depend
// only on these, never on counts in device memory, so a plan serves every replay of a captured step.
CompressedAttentionPlan plan_compressed_attention(const CompressedLayer& layer, const CodingTables* tables,
                                                  const CompressedAttentionShape& shape, int rows,
                                                  const DeviceLimits& device);

// Workspace for any plan of at most `rows` rows; atoms: the layer's dictionary size (0 for a layer that codes
// nothing). Its contents need no initialising.
size_t compressed_attention_workspace_bytes(const CompressedAttentionShape& shape, int rows, int kv_heads, int head_dim,
                                            int atoms, const DeviceLimits& device);

}  // namespace kvplan::cuda
