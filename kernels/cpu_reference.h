// CPU reference implementations of every kernel kvplan runs. They are the oracle the CUDA kernels are
// tested against and the CPU runtime's execution path, so they favour clarity and fp32 accuracy.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// out[r, :] = x[r, :] / rms(x[r, :]) * weight.  x, out: [rows, dim].
void rms_norm(const float* x, const float* weight, int64_t rows, int dim, float eps, float* out);

// Rotates x in place with the rotate-half (GPT-NeoX / HF Llama) layout: dims i and i + head_dim/2 form a pair.
// x: [tokens, heads, head_dim]; positions: [tokens]; inv_freq: [head_dim / 2].
// attention_factor scales cos/sin (1 except for YaRN).
void apply_rope(float* x, const int32_t* positions, const float* inv_freq, int tokens, int heads, int head_dim,
                float attention_factor);

// x[r, :] += bias.
void add_row_bias(float* x, const float* bias, int64_t rows, int dim);

// out = silu(gate) * up, elementwise over n values.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// The cached tokens of one KV head. Entries need not be contiguous in position (compressed caches evict and
// merge), so each carries its own position; logit_bias (nullable) is added to the entry's attention logit,
// which is how merged entries stand for the several tokens they replaced.
struct KvHeadView {
  const float* keys = nullptr;         // [length, head_dim]
  const float* values = nullptr;       // [length, head_dim]
  const int32_t* positions = nullptr;  // [length]
  const float* logit_bias = nullptr;   // [length] or null
  int length = 0;
};

// Causal grouped-query attention of `tokens` queries over a cache. Query t of head h sees entry j of KV head
// h / (heads / kv_heads) when positions[j] <= query_positions[t] and, with sliding_window > 0, when
// query_positions[t] - positions[j] < sliding_window.
// q, out: [tokens, heads, head_dim].  A query that sees no entry gets a zero output.
void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out);

// --- Compressed caches -------------------------------------------------------------------------------------

// Nearest fp16-representable value (ties to even), saturating at the fp16 range: the precision of stored
// sparse-code coefficients.
float round_to_fp16(float value);

// Matching pursuit of x ([dim]) over unit-norm atoms ([atoms, dim]): `sparsity` times, pick the atom with the
// largest |<residual, atom>| and subtract its projection. Coefficients are rounded to fp16, the precision
// they are stored in, before the residual is updated. Writes indices and coefficients ([sparsity]).
void matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int sparsity, uint16_t* indices,
                      float* coefficients);

// out[dim] = sum_i coefficients[i] * dictionary[indices[i], :]
void decode_sparse(const float* dictionary, int dim, const uint16_t* indices, const float* coefficients, int sparsity,
                   float* out);

// One KV head of a compressed cache: entries coded against dictionaries (keys before RoPE) plus dense entries
// (recent tokens and merged slots, keys after RoPE, optional logit bias).
struct CodedHeadView {
  const uint16_t* key_atoms = nullptr;        // [coded_length, key_sparsity]
  const float* key_coefficients = nullptr;    // [coded_length, key_sparsity]
  const uint16_t* value_atoms = nullptr;      // [coded_length, value_sparsity]
  const float* value_coefficients = nullptr;  // [coded_length, value_sparsity]
  const int32_t* coded_positions = nullptr;   // [coded_length]
  int coded_length = 0;
  KvHeadView dense;
};

struct SparseAttentionParams {
  int tokens = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int key_sparsity = 0, value_sparsity = 0;
  const float* key_dictionary = nullptr;    // [atoms, head_dim], shared by the layer's KV heads
  const float* value_dictionary = nullptr;  // [atoms, head_dim]
  const float* inv_freq = nullptr;          // [head_dim / 2], RoPE for the decoded keys
  float rope_attention_factor = 1.0f;
  float scale = 1.0f;
};

// Causal attention over compressed heads; coded keys are decoded and rotated to their positions on the fly and
// values are decoded from their atoms. When max_probabilities is not null, it receives for every KV head the
// softmax probability of each entry [coded entries, dense entries], maxed over every query row and every query
// head of the group: the signal attention-score eviction and RefreshKV selection use (every row observes, so a
// token the chunk itself refers back to, like a pass key repeated in its sentence, scores high before later
// chunks arrive). Layout: kv head h starts at the sum over earlier heads of (coded_length + dense.length).
void sparse_attention(const SparseAttentionParams& params, const float* q, const int32_t* query_positions,
                      const CodedHeadView* kv, float* out, float* max_probabilities);

// Eviction scoring: norms[i] = ||keys[i, :]||. L2-norm eviction keeps the lowest-norm keys.
void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms);

// ZeroMerge: folds `count` victims ([count, head_dim] keys and values, in order) into a residual slot holding the
// running mean of `*slot_tokens` tokens; *slot_tokens grows by count.
void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens);

}  // namespace kvplan::cpu
