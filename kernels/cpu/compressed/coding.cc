#include "kernels/cpu/compressed/coding.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "base/number_formats.h"
#include "kernels/cpu/compressed/common.h"
#include "kernels/cpu/elementwise.h"

namespace kvplan::cpu {

void gather_leaving_entries(const CompressedLayer& layer, const CodingTables& tables, const StepRowsView& step,
                            int coding_window, int max_leaving, float* keys, float* values, int32_t* leaving_slots,
                            int32_t* leaving_count) {
  const int hd = layer.head_dim;
  for (int j = 0; j < step.sequences; ++j) {
    const int32_t leaves_before = StepLength(step, j) - coding_window;
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
      int count = 0;
      for (int64_t slot = layer.dense_begin[head]; slot < layer.dense_begin[head] + layer.dense_count[head]; ++slot) {
        if (layer.dense_positions[slot] >= leaves_before) continue;
        RequireSlot(count < max_leaving);
        const int64_t row = group * max_leaving + count++;
        leaving_slots[row] = int32_t(slot);
        float* key = keys + row * hd;
        for (int d = 0; d < hd; ++d) {
          key[d] = Bf16ToFloat(layer.dense_keys[slot * hd + d]);
          values[row * hd + d] = Bf16ToFloat(layer.dense_values[slot * hd + d]);
        }
        if (!tables.keys_after_rope) {
          // Rotating by -position undoes RoPE; YaRN's magnitude factor is divided back out.
          const int32_t inverse = -layer.dense_positions[slot];
          apply_rope(key, &inverse, tables.inv_freq, 1, 1, hd, 1.0f);
          if (tables.rope_attention_factor != 1.0f)
            for (int d = 0; d < hd; ++d) key[d] /= tables.rope_attention_factor;
        }
      }
      leaving_count[group] = count;
    }
  }
}

void commit_leaving_entries(const CompressedLayer& layer, const StepRowsView& step, int max_leaving,
                            const int32_t* leaving_slots, const int32_t* leaving_count, const uint32_t* key_codes,
                            const uint32_t* value_codes) {
  const int sk = layer.key_sparsity, sv = layer.value_sparsity;
  for (int j = 0; j < step.sequences; ++j)
    for (int h = 0; h < layer.kv_heads; ++h) {
      const int64_t head = HeadSlot(layer, step, j, h), group = int64_t(j) * layer.kv_heads + h;
      const int64_t dense_base = layer.dense_begin[head];
      std::vector<uint8_t> removed(layer.dense_count[head], 0);
      for (int t = 0; t < leaving_count[group]; ++t) {
        const int64_t row = group * max_leaving + t, source = leaving_slots[row];
        const int64_t target = layer.coded_begin[head] + layer.coded_count[head]++;
        RequireSlot(target < layer.coded_begin[head + 1]);
        std::copy_n(key_codes + row * sk, sk, layer.key_codes + target * sk);
        std::copy_n(value_codes + row * sv, sv, layer.value_codes + target * sv);
        layer.coded_positions[target] = layer.dense_positions[source];
        if (layer.coded_scores) layer.coded_scores[target] = layer.dense_scores[source];
        if (layer.coded_selected) layer.coded_selected[target] = layer.dense_selected[source];
        removed[source - dense_base] = 1;
      }
      CompactRegion(removed, dense_base, layer.dense_count + head,
                    [&](int64_t from, int64_t to) { MoveDenseSlot(layer, from, to); });
    }
}

void quantize_vector(const float* x, int dim, int bits, const float* channel_scale, uint32_t* words) {
  std::vector<float> y(x, x + dim);
  if (channel_scale)
    for (int d = 0; d < dim; ++d) y[d] /= channel_scale[d];
  const auto [low, high] = std::minmax_element(y.begin(), y.end());
  const float levels = float((1u << bits) - 1u);
  const uint16_t minimum_bits = FloatToFp16(*low);
  const float minimum = Fp16ToFloat(minimum_bits);
  const uint16_t scale_bits = FloatToFp16((*high - minimum) / levels);
  const float scale = Fp16ToFloat(scale_bits);
  std::fill_n(words, QuantizedWords(dim, bits), 0u);
  words[0] = uint32_t(scale_bits) | (uint32_t(minimum_bits) << 16);
  for (int d = 0; d < dim; ++d) {
    const float level = scale > 0.0f ? std::clamp(std::nearbyint((y[d] - minimum) / scale), 0.0f, levels) : 0.0f;
    words[1 + d * bits / 32] |= uint32_t(level) << ((d * bits) % 32);
  }
}

void dequantize_vector(const uint32_t* words, int dim, int bits, const float* channel_scale, float* out) {
  const float scale = Fp16ToFloat(uint16_t(words[0] & 0xffff)), minimum = Fp16ToFloat(uint16_t(words[0] >> 16));
  for (int d = 0; d < dim; ++d) {
    out[d] = minimum + scale * float(QuantizedLevel(words, d, bits));
    if (channel_scale) out[d] *= channel_scale[d];
  }
}

void decode_codes(const float* dictionary, int dim, const uint32_t* codes, int sparsity, float* out) {
  std::fill(out, out + dim, 0.0f);
  for (int s = 0; s < sparsity; ++s) {
    const float coefficient = Fp16ToFloat(uint16_t(codes[s] >> 16));
    const float* atom = dictionary + int64_t(codes[s] & 0xffff) * dim;
    for (int d = 0; d < dim; ++d) out[d] += coefficient * atom[d];
  }
}

float round_to_fp16(float value) { return Fp16ToFloat(FloatToFp16(value)); }

}  // namespace kvplan::cpu
