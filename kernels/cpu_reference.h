// CPU reference implementations of every kernel kvplan runs. They are the oracle the CUDA kernels are
// tested against and the CPU runtime's execution path, so they favour clarity and fp32 accuracy.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// out[r, :] = x[r, :] / rms(x[r, :]) * weight.  x, out: [rows, dim].
void rms_norm(const float* x, const float* weight, int64_t rows, int dim, float eps, float* out);

// Rotates x in place with the rotate-half (GPT-NeoX / HF Llama) layout: dims i and i + head_dim/2 form a pair.
// x: [tokens, heads, head_dim]; positions: [tokens]; inv_freq: [head_dim / 2].
// attention_factor scales cos/sin (1 except for YaRN).
void apply_rope(float* x, const int32_t* positions, const float* inv_freq, int tokens, int heads, int head_dim,
                float attention_factor);

// Benchmarks: out[i] = bf16(2 * NoiseValue(NoiseBits(seed, i))) (kernels/compressed_layout.h), about unit scale.
void fill_noise_bf16(uint16_t* out, int64_t n, uint32_t seed);

// x[r, :] += bias.
void add_row_bias(float* x, const float* bias, int64_t rows, int dim);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, ffn + i]: gate and up projections stacked in one row
// ([rows, 2 ffn], as one GEMM makes them); out: [rows, ffn].
void swiglu(const float* gate_up, int64_t rows, int ffn, float* out);

// The cached tokens of one KV head of the full cache, each with its position.
struct KvHeadView {
  const float* keys = nullptr;         // [length, head_dim]
  const float* values = nullptr;       // [length, head_dim]
  const int32_t* positions = nullptr;  // [length]
  int length = 0;
};

// Causal grouped-query attention of `tokens` queries over a cache. Query t of head h sees entry j of KV head
// h / (heads / kv_heads) when positions[j] <= query_positions[t] and, with sliding_window > 0, when
// query_positions[t] - positions[j] < sliding_window.
// q, out: [tokens, heads, head_dim].  A query that sees no entry gets a zero output.
void attention(const float* q, const int32_t* query_positions, int tokens, int heads, const KvHeadView* kv,
               int kv_heads, int head_dim, float scale, int sliding_window, float* out);

// --- Sparse coding -----------------------------------------------------------------------------------------

// Nearest fp16-representable value (ties to even), saturating at the fp16 range: the precision of stored
// sparse-code coefficients.
float round_to_fp16(float value);
// A (atom, coefficient) pair packed as kernels/compressed_layout.h stores it.
uint32_t pack_code(uint16_t atom, float coefficient);

// Matching pursuit of x ([dim]) over unit-norm atoms ([atoms, dim]): `sparsity` times, pick the atom with the
// largest |<residual, atom>| and subtract its projection. Coefficients are rounded to fp16, the precision
// they are stored in, before the residual is updated. Writes indices and coefficients ([sparsity]).
void matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int sparsity, uint16_t* indices,
                      float* coefficients);

// out[dim] = sum_i coefficients[i] * dictionary[indices[i], :]
void decode_sparse(const float* dictionary, int dim, const uint16_t* indices, const float* coefficients, int sparsity,
                   float* out);

// Quantizes x[dim], each channel first divided by channel_scale[d] when that is non-null, to `bits`-bit integers
// over the vector's range (QuantizedWords(dim, bits) words, laid out as kernels/compressed_layout.h says): the
// fp16 minimum is the range's rounded low end, the fp16 scale (high - minimum) / (2^bits - 1), and each integer
// round-to-nearest-even of (y - minimum) / scale clamped to the levels (0 when the scale is 0).
void quantize_vector(const float* x, int dim, int bits, const float* channel_scale, uint32_t* words);
// out[d] = (minimum + scale * q_d) * channel_scale[d] (1 when null).
void dequantize_vector(const uint32_t* words, int dim, int bits, const float* channel_scale, float* out);

// --- Compressed layer caches (kernels/compressed_layout.h) ----------------------------------------------------
// Each function is the oracle of the CUDA kernel of the same name and acts on the same arrays the same way, down
// to which slot an entry lands in, so tests compare the storage exactly.

// Decodes one vector: out[dim] = sum_i fp16(code_i) * dictionary[atom(code_i), :] over packed codes.
void decode_codes(const float* dictionary, int dim, const uint32_t* codes, int sparsity, float* out);

// Appends every row's keys (after RoPE) and values ([rows, kv_heads, head_dim]) as bf16 dense entries of its
// head, in row order, at the end of the head's live slots. key_norms ([rows, kv_heads], nullable) become the
// entries' scores (0 without), and the entries start unselected.
void compressed_append(const CompressedLayer& layer, const StepRowsView& step, const float* keys, const float* values,
                       const float* key_norms);

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

// Attention scoring: every live entry of a stepping head: score = score * decay + probability.
void update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                   const float* dense_probabilities, const float* coded_probabilities);

// RefreshKV, before the attention: a stepping sequence takes a full step when none has happened, when the stride
// is due (steps_since_refresh + 1 >= refresh_stride), or when the mean over query heads of its last row's query
// has cosine below the threshold to the last full step's. Writes full_step and step_query.
void refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                    const float* q, int heads, int head_dim);

// RefreshKV, after the attention: on a full step every head of the sequence selects min(targets.selected, live)
// entries, the highest probabilities after max-pooling each entry's over the entries within pool_kernel / 2
// positions of it, ties to the newer position; the sequence's refresh_position becomes its length and its query
// the step's. Otherwise steps_since_refresh grows.
void refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                    const StepTargets& targets, const RefreshSettings& settings, const float* dense_probabilities,
                    const float* coded_probabilities);

// Token budgets: each stepping head removes live entries until targets.kept remain, taking only candidates
// (neither among the first sink_tokens positions nor among the protected_recent newest), the highest key norms
// (keep_low_key_norms) or the lowest scores first, older first on ties. With merge_evicted, the victims' keys
// (after RoPE; coded ones decoded, and rotated when coded before RoPE) and values are folded, in position order,
// into the head's merged slot. Dense and coded regions are then compacted (CompactionMoves).
void evict(const CompressedLayer& layer, const CodingTables* tables, const StepRowsView& step,
           const StepTargets& targets, const EvictionSettings& settings);

// CSR, in three parts so any matching-pursuit encoder can code in between. Gather: each stepping head's dense
// entries older than the coding window (position < length - coding_window), in slot order, as vectors to code:
// group g = j * kv_heads + h holds leaving_count[g] <= max_leaving of them at rows g * max_leaving + t of keys and
// values ([groups * max_leaving, head_dim]; keys turned back to before RoPE unless the layer codes after it) and
// their dense slots in leaving_slots.
void gather_leaving_entries(const CompressedLayer& layer, const CodingTables& tables, const StepRowsView& step,
                            int coding_window, int max_leaving, float* keys, float* values, int32_t* leaving_slots,
                            int32_t* leaving_count);
// Commit: the coded vectors' packed codes ([groups * max_leaving, sparsity], rows as gathered) become coded entries
// after each head's live coded ones, in gathered order, with the dense entries' positions, scores and selection;
// the dense region is then compacted.
void commit_leaving_entries(const CompressedLayer& layer, const StepRowsView& step, int max_leaving,
                            const int32_t* leaving_slots, const int32_t* leaving_count, const uint32_t* key_codes,
                            const uint32_t* value_codes);

// Benchmarks: the storage a sequence of fill.lengths[s] tokens could leave, without running the model: each head
// slot holds its newest fill.dense[i] positions as dense entries and the fill.coded[i] before them as codes, its
// merged slot (when fill.merged[i]) the older tokens, and its first fill.selected[i] entries (dense, then coded)
// selected; keys, values, codes and scores are NoiseBits of the entry's index.
void fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill);

// How a region of `live` slots stays dense when the marked ones are removed: with m = live - removed, the kept
// entries at or past m move, in slot order, into the removed slots below m, in slot order. Returns the moves as
// (from, to) slot pairs.
std::vector<std::pair<int, int>> CompactionMoves(const uint8_t* removed, int live);

// Eviction scoring: norms[i] = ||keys[i, :]||. L2-norm eviction keeps the lowest-norm keys.
void key_l2_norms(const float* keys, int64_t n, int head_dim, float* norms);

// ZeroMerge: folds `count` victims ([count, head_dim] keys and values, in order) into a residual slot holding the
// running mean of `*slot_tokens` tokens; *slot_tokens grows by count.
void merge_into_slot(const float* keys, const float* values, int count, int head_dim, float* slot_key,
                     float* slot_value, float* slot_tokens);

}  // namespace kvplan::cpu
