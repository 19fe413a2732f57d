// The arrays of a compressed layer (kernels/compressed_layout.h), each named once: its element type, its extent
// and when it exists. The views the kernels take (CompressedLayer, RefreshStateView) get their fields from these
// tables, and every owner of the arrays (the CPU runtime's host vectors, the CUDA runtime's device buffers, the
// kernel tests and the kernel bench) sizes, allocates, resets, copies and views them by visiting the tables, so
// adding an array is one line here plus the kernels that use it.
//
// Plain C++17 (nvcc compiles the kernels as C++17), so nvcc and the host compiler read it alike.
#pragma once

#include <cstdint>
#include <type_traits>

namespace kvplan {

// The terms the tables' columns use.
namespace layout {
// How many rows an array has.
enum Rows : uint8_t {
  kRegionBounds,  // head_slots + 1: the regions' bounds (CompressedRegions), fixed for the cache's life
  kHeadSlots,     // one per head slot (sequence * kv_heads + kv_head), sequence-major
  kDenseSlots,    // one per slot of the head slots' dense regions together
  kCodedSlots,    // one per slot of the coded regions together
  kSequences,     // one per cache sequence
};
// Values per row.
enum Width : uint8_t { kOne, kHeadDim, kKeySparsity, kValueSparsity };
// The features an array needs, all of them, to exist. A layer without them keeps the array empty: its view
// pointer is null, which is how the kernels tell the feature is off.
enum Needs : uint8_t { kAlways = 0, kCoding = 1, kScores = 2, kRefresh = 4, kMerging = 8 };
// What forgetting a sequence does to its rows: zero them (the counts and flags that say what is live), or keep
// them (entries past a count, and state rewritten before it is read, are never read).
enum Reset : uint8_t { kKept, kZeroed };
}  // namespace layout

// X(element type, name, rows, width, needs, reset) for every array of CompressedLayer, in its fields' order.
// Dense entries are the uncoded tokens, keys after RoPE. Coded entries are the tokens older than the coding window,
// as (atom, coefficient) pairs (PackCode) or, in a quantized layer, QuantizedVector words (the sparsities are then
// the words per vector). ZeroMerge keeps one slot per head slot with the running mean of the evicted tokens' K
// (after RoPE) and V.
#define KVPLAN_COMPRESSED_LAYER_ARRAYS(X)                                                                            \
  X(const int32_t, dense_begin, kRegionBounds, kOne, kAlways, kKept) /* head slot i owns [begin[i], begin[i + 1]) */ \
  X(int32_t, dense_count, kHeadSlots, kOne, kAlways, kZeroed)        /* live entries: the region's first slots */    \
  X(uint16_t, dense_keys, kDenseSlots, kHeadDim, kAlways, kKept)     /* bf16 */                                      \
  X(uint16_t, dense_values, kDenseSlots, kHeadDim, kAlways, kKept)   /* bf16 */                                      \
  X(int32_t, dense_positions, kDenseSlots, kOne, kAlways, kKept)                                                     \
  X(float, dense_scores, kDenseSlots, kOne, kScores, kKept)          /* eviction score */                            \
  X(uint8_t, dense_selected, kDenseSlots, kOne, kRefresh, kKept)     /* RefreshKV small-cache membership */          \
  X(const int32_t, coded_begin, kRegionBounds, kOne, kAlways, kKept) /* all zero when the layer codes nothing */     \
  X(int32_t, coded_count, kHeadSlots, kOne, kCoding, kZeroed)                                                        \
  X(uint32_t, key_codes, kCodedSlots, kKeySparsity, kCoding, kKept)                                                  \
  X(uint32_t, value_codes, kCodedSlots, kValueSparsity, kCoding, kKept)                                              \
  X(int32_t, coded_positions, kCodedSlots, kOne, kCoding, kKept)                                                     \
  X(float, coded_scores, kCodedSlots, kOne, kCoding | kScores, kKept)                                                \
  X(uint8_t, coded_selected, kCodedSlots, kOne, kCoding | kRefresh, kKept)                                           \
  X(float, merged_keys, kHeadSlots, kHeadDim, kMerging, kKept) /* an empty slot's means are never read */            \
  X(float, merged_values, kHeadSlots, kHeadDim, kMerging, kKept)                                                     \
  X(float, merged_tokens, kHeadSlots, kOne, kMerging, kZeroed) /* tokens folded in; 0: no merged entry yet */

// The same for RefreshStateView: the RefreshKV state of every cache sequence of one layer.
#define KVPLAN_REFRESH_STATE_ARRAYS(X)                                                                              \
  X(int32_t, refresh_position, kSequences, kOne, kRefresh, kZeroed) /* entries at or after it are always in view */ \
  X(int32_t, steps_since_refresh, kSequences, kOne, kRefresh, kZeroed)                                              \
  X(uint8_t, has_query, kSequences, kOne, kRefresh, kZeroed)  /* whether a full step has happened */                \
  X(uint8_t, full_step, kSequences, kOne, kRefresh, kKept)    /* this step's decision */                            \
  X(float, query, kSequences, kHeadDim, kRefresh, kKept)      /* the last full step's mean query */                 \
  X(float, step_query, kSequences, kHeadDim, kRefresh, kKept) /* this step's mean query */

// One row of a table, as the visitors hand it over.
struct ArraySpec {
  const char* name;
  int element_bytes;
  layout::Rows rows;
  layout::Width width;
  int needs;  // layout::Needs, or-ed
  layout::Reset reset;
  bool is_bounds() const { return rows == layout::kRegionBounds; }
};

// What sizes a layer's arrays, beside its regions: its dimensions and which features it has.
struct CompressedArrayShape {
  int head_slots = 1, kv_heads = 1, head_dim = 16;
  int key_sparsity = 0, value_sparsity = 0;               // 0: no coded region
  bool scores = false, selected = false, merged = false;  // budgets' scores, RefreshKV, ZeroMerge
};

// Elements of one array for a layer of `shape` whose regions hold dense_slots and coded_slots in all; 0 for an
// array the layer does not keep.
inline int64_t ArrayElements(const ArraySpec& spec, const CompressedArrayShape& shape, int64_t dense_slots,
                             int64_t coded_slots) {
  using namespace layout;
  const int features = (shape.key_sparsity > 0 ? kCoding : 0) | (shape.scores ? kScores : 0) |
                       (shape.selected ? kRefresh : 0) | (shape.merged ? kMerging : 0);
  if ((spec.needs & ~features) != 0) return 0;
  const int64_t rows = spec.rows == kRegionBounds ? shape.head_slots + 1
                       : spec.rows == kHeadSlots  ? shape.head_slots
                       : spec.rows == kDenseSlots ? dense_slots
                       : spec.rows == kCodedSlots ? coded_slots
                                                  : shape.head_slots / shape.kv_heads;
  const int64_t width = spec.width == kHeadDim         ? shape.head_dim
                        : spec.width == kKeySparsity   ? shape.key_sparsity
                        : spec.width == kValueSparsity ? shape.value_sparsity
                                                       : 1;
  return rows * width;
}

// Storage with one holder per array of both tables, named as the views' fields: Holder<T> is a std::vector<T> on
// the host, a device buffer on the device.
template <template <typename> class Holder>
struct CompressedArrays {
#define KVPLAN_HOLD_ARRAY(type, name, ...) Holder<std::remove_const_t<type>> name;
  KVPLAN_COMPRESSED_LAYER_ARRAYS(KVPLAN_HOLD_ARRAY)
  KVPLAN_REFRESH_STATE_ARRAYS(KVPLAN_HOLD_ARRAY)
#undef KVPLAN_HOLD_ARRAY
};

// Calls visit(spec, parts.name...) for every array of a table, in its order. Each part is anything with a member
// per array named as the view's field: a view, CompressedArrays, a HostCompressedLayer; visiting two parts at
// once pairs their arrays (a view's field with its holder, a host vector with its device copy).
#define KVPLAN_VISIT_ARRAY(type, name, rows, width, needs, reset) \
  visit(ArraySpec{#name, int(sizeof(type)), rows, width, needs, reset}, parts.name...);
template <typename Visit, typename... Parts>
void ForEachLayerArray(Visit&& visit, Parts&&... parts) {
  using namespace layout;
  KVPLAN_COMPRESSED_LAYER_ARRAYS(KVPLAN_VISIT_ARRAY)
}
template <typename Visit, typename... Parts>
void ForEachRefreshArray(Visit&& visit, Parts&&... parts) {
  using namespace layout;
  KVPLAN_REFRESH_STATE_ARRAYS(KVPLAN_VISIT_ARRAY)
}
#undef KVPLAN_VISIT_ARRAY
// Both tables: what storage does with every array it holds.
template <typename Visit, typename... Parts>
void ForEachArray(Visit&& visit, Parts&&... parts) {
  ForEachLayerArray(visit, parts...);
  ForEachRefreshArray(visit, parts...);
}

}  // namespace kvplan
