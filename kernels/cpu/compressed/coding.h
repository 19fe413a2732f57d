// CPU oracles of the coding kernels (kernels/cuda/compressed/coding.cu): CSR's gather and commit of the entries
// leaving the coding window, and the quantized and sparse-code formats of a coded entry. The layer functions act on
// the arrays of kernels/compressed_layout.h as the CUDA kernels of the same name do.
#pragma once

#include <cstdint>

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

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

// Quantizes x[dim], each channel first divided by channel_scale[d] when that is non-null, to `bits`-bit integers
// over the vector's range (QuantizedWords(dim, bits) words, laid out as kernels/compressed_layout.h says): the
// fp16 minimum is the range's rounded low end, the fp16 scale (high - minimum) / (2^bits - 1), and each integer
// round-to-nearest-even of (y - minimum) / scale clamped to the levels (0 when the scale is 0).
void quantize_vector(const float* x, int dim, int bits, const float* channel_scale, uint32_t* words);
// out[d] = (minimum + scale * q_d) * channel_scale[d] (1 when null).
void dequantize_vector(const uint32_t* words, int dim, int bits, const float* channel_scale, float* out);

// Decodes one vector: out[dim] = sum_i fp16(code_i) * dictionary[atom(code_i), :] over packed codes.
void decode_codes(const float* dictionary, int dim, const uint32_t* codes, int sparsity, float* out);

// Nearest fp16-representable value (ties to even), saturating at the fp16 range: the precision of stored
// sparse-code coefficients.
float round_to_fp16(float value);

}  // namespace kvplan::cpu
