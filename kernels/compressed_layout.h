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
// Plain C++ only (pointers and integers), so nvcc and the host compiler read it alike.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define KVPLAN_HOST_DEVICE __host__ __device__
#else
#define KVPLAN_HOST_DEVICE
#endif

namespace kvplan {

// One layer's storage. Pointers are host or device memory, as the owner allocated them.
struct CompressedLayer {
  int head_slots = 0;  // sequences * kv_heads
  int kv_heads = 0;
  int head_dim = 0;
  int key_sparsity = 0, value_sparsity = 0;  // 0 when the layer codes nothing

  // Dense entries: uncoded tokens, keys after RoPE.
  const int32_t* dense_begin = nullptr;  // [head_slots + 1]: head slot i owns [dense_begin[i], dense_begin[i + 1])
  int32_t* dense_count = nullptr;        // [head_slots] live entries, the first slots of the region
  uint16_t* dense_keys = nullptr;        // [dense slots, head_dim] bf16
  uint16_t* dense_values = nullptr;      // [dense slots, head_dim] bf16
  int32_t* dense_positions = nullptr;    // [dense slots]
  float* dense_scores = nullptr;         // [dense slots] eviction score; null without a budget
  uint8_t* dense_selected = nullptr;     // [dense slots] RefreshKV small-cache membership; null without refresh

  // Coded entries: tokens older than the coding window, as (atom, coefficient) pairs.
  const int32_t* coded_begin = nullptr;  // [head_slots + 1]
  int32_t* coded_count = nullptr;        // [head_slots]
  uint32_t* key_codes = nullptr;         // [coded slots, key_sparsity] packed codes (PackCode)
  uint32_t* value_codes = nullptr;       // [coded slots, value_sparsity]
  int32_t* coded_positions = nullptr;
  float* coded_scores = nullptr;
  uint8_t* coded_selected = nullptr;

  // ZeroMerge: one slot per head slot holding the running mean of the evicted tokens' K (after RoPE) and V.
  float* merged_keys = nullptr;    // [head_slots, head_dim]; null without merging
  float* merged_values = nullptr;  // [head_slots, head_dim]
  float* merged_tokens = nullptr;  // [head_slots] tokens folded in; 0: no merged entry yet
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

// RefreshKV state of every cache sequence of one layer.
struct RefreshStateView {
  int32_t* refresh_position = nullptr;     // [sequences] entries at or after this position are always in view
  int32_t* steps_since_refresh = nullptr;  // [sequences]
  uint8_t* has_query = nullptr;            // [sequences] whether a full step has happened
  uint8_t* full_step = nullptr;            // [sequences] this step's decision
  float* query = nullptr;                  // [sequences, head_dim] the last full step's mean query
  float* step_query = nullptr;             // [sequences, head_dim] this step's mean query
};

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
