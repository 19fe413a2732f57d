// The storage of one layer's compressed KV cache as flat arrays, and the per-step descriptions the operations
// on it take. The CPU runtime holds these arrays in host memory and runs kernels/cpu/compressed/ on them; the
// CUDA runtime holds them in device memory and runs kernels/cuda/kernels.h on them; the same decisions come out
// of both because the CPU functions are the GPU kernels' oracles, array for array.
//
// Every KV head of every sequence ("head slot" i = sequence * kv_heads + kv_head) owns a fixed region of each
// array, sized by the host from the cache policy (no padding to the longest head). A region's live entries are
// its first `count` slots, in no particular order: attention is order-free and every entry carries its position.
// Removing entries keeps regions dense with one deterministic rule (cpu::CompactionMoves) that both backends use.
//
// Plain C++17 (pointers, integers and the templates that view storage), so nvcc and the host compiler read it
// alike.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/compressed_arrays.h"

#ifdef __CUDACC__
#define KVPLAN_HOST_DEVICE __host__ __device__
#else
#define KVPLAN_HOST_DEVICE
#endif

namespace kvplan {

// One layer's storage, its arrays as kernels/compressed_arrays.h lists them. Pointers are host or device memory,
// as the owner allocated them; an array the layer does not keep is null.
#define KVPLAN_VIEW_FIELD(type, name, ...) type* name = nullptr;
struct CompressedLayer {
  int head_slots = 0;  // sequences * kv_heads
  int kv_heads = 0;
  int head_dim = 0;
  int key_sparsity = 0, value_sparsity = 0;  // 0 when the layer codes nothing
  KVPLAN_COMPRESSED_LAYER_ARRAYS(KVPLAN_VIEW_FIELD)
};

// A code: atom index in the low 16 bits, the fp16 coefficient's bits in the high 16.
KVPLAN_HOST_DEVICE inline constexpr uint32_t PackCode(uint16_t atom, uint16_t fp16_coefficient) {
  return uint32_t(atom) | (uint32_t(fp16_coefficient) << 16);
}

// A quantized vector of dim channels as 32-bit words: word 0 holds the fp16 scale (low half) and the fp16 minimum
// (high half); channel d's `bits`-bit integer q (32 % bits == 0) sits at bit (d * bits) % 32 of word
// 1 + d * bits / 32, and decodes to minimum + scale * q.
KVPLAN_HOST_DEVICE inline uint32_t QuantizedLevel(const uint32_t* words, int d, int bits) {
  return (words[1 + d * bits / 32] >> ((d * bits) % 32)) & ((1u << bits) - 1u);
}

// Deterministic noise for benchmark fills, the same on host and device: a 32-bit mix of (seed, index), and a
// float in [-0.5, 0.5) from it.
KVPLAN_HOST_DEVICE inline uint32_t NoiseBits(uint32_t seed, uint64_t index) {
  uint64_t z = index * 0x9e3779b97f4a7c15ull + seed;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return uint32_t((z ^ (z >> 31)) >> 32);
}
KVPLAN_HOST_DEVICE inline float NoiseValue(uint32_t bits) { return float(bits >> 8) * 0x1p-24f - 0.5f; }

// What a layer codes against: CSR dictionaries, or, with key_bits > 0, per-token integer quantization.
struct CodingTables {
  int atoms = 0;
  const float* key_atoms = nullptr;    // [atoms, head_dim] unit rows
  const float* value_atoms = nullptr;  // [atoms, head_dim]
  // Quantized layers (then keys_after_rope): a coded vector is QuantizedVector words, keys divided by their
  // channel's scale before quantizing.
  int key_bits = 0, value_bits = 0;
  const float* key_channel_scale = nullptr;  // [kv_heads, head_dim]
  bool keys_after_rope = false;              // else coded keys are rotated to their positions when decoded
  const float* inv_freq = nullptr;           // [head_dim / 2]
  float rope_attention_factor = 1.0f;
};

// The rows of one step, grouped by sequence. Rows of one sequence are consecutive and in position order.
struct StepRowsView {
  int rows = 0;
  const int32_t* row_sequence = nullptr;  // [rows]
  const int32_t* row_position = nullptr;  // [rows]
  int sequences = 0;                      // distinct sequences in the step
  const int32_t* sequence = nullptr;      // [sequences]: the cache sequence of step sequence j
  const int32_t* row_begin = nullptr;     // [sequences + 1]: step sequence j's rows are [row_begin[j], row_begin[j+1])
};

// Per step sequence j and KV head h (index j * kv_heads + h): how many entries the host's policy says remain.
struct StepTargets {
  const int32_t* kept = nullptr;      // plain entries after eviction (plans/cache_policy.h KeptTokens)
  const int32_t* selected = nullptr;  // RefreshKV: entries a full step selects (SmallCacheTokens)
};

// What a benchmark fill leaves in each head slot (arrays of head_slots); lengths: [sequences].
struct NoiseFill {
  const int32_t* lengths = nullptr;
  const int32_t* dense = nullptr;
  const int32_t* coded = nullptr;
  const uint8_t* merged = nullptr;
  const int32_t* selected = nullptr;  // null without RefreshKV
  int atoms = 1;
  uint32_t seed = 0;
};

// RefreshKV state of every cache sequence of one layer (KVPLAN_REFRESH_STATE_ARRAYS).
struct RefreshStateView {
  KVPLAN_REFRESH_STATE_ARRAYS(KVPLAN_VIEW_FIELD)
};
#undef KVPLAN_VIEW_FIELD

// The views of storage that holds every array (CompressedArrays, a HostCompressedLayer): `pointer(holder)` is
// where a holder's elements are, null for an empty one.
template <typename Pointer>
auto PointFieldsAt(Pointer pointer) {
  return [pointer](const ArraySpec&, auto& holder, auto& field) {
    field = static_cast<std::remove_reference_t<decltype(field)>>(pointer(holder));
  };
}
template <typename Storage, typename Pointer>
CompressedLayer LayerView(const CompressedArrayShape& shape, Storage& storage, Pointer pointer) {
  CompressedLayer view;
  view.head_slots = shape.head_slots;
  view.kv_heads = shape.kv_heads;
  view.head_dim = shape.head_dim;
  view.key_sparsity = shape.key_sparsity;
  view.value_sparsity = shape.value_sparsity;
  ForEachLayerArray(PointFieldsAt(pointer), storage, view);
  return view;
}
template <typename Storage, typename Pointer>
RefreshStateView RefreshView(Storage& storage, Pointer pointer) {
  RefreshStateView view;
  ForEachRefreshArray(PointFieldsAt(pointer), storage, view);
  return view;
}

// Settings of the operations, from the layer's cache policy.
struct EvictionSettings {
  bool keep_low_key_norms = true;  // L2 scoring; else attention scores, the highest kept
  int sink_tokens = 0;
  int protected_recent = 0;  // ProtectedRecentTokens
  bool merge_evicted = false;
};
struct RefreshSettings {
  int refresh_stride = 1;
  float query_similarity_threshold = 0.0f;
  int pool_kernel = 1;
};

}  // namespace kvplan
