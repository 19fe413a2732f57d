#include "kernels/cpu/compressed/noise.h"

#include "base/number_formats.h"

namespace kvplan::cpu {

void fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill) {
  const int hd = layer.head_dim, sk = layer.key_sparsity, sv = layer.value_sparsity;
  for (int i = 0; i < layer.head_slots; ++i) {
    const int32_t length = fill.lengths[i / layer.kv_heads], dense = fill.dense[i];
    const int coded = layer.coded_count ? fill.coded[i] : 0;
    const int selected = fill.selected ? fill.selected[i] : 0;
    layer.dense_count[i] = dense;
    for (int e = 0; e < dense; ++e) {
      const int64_t slot = layer.dense_begin[i] + e;
      for (int d = 0; d < hd; ++d) {
        layer.dense_keys[slot * hd + d] = FloatToBf16(2.0f * NoiseValue(NoiseBits(fill.seed, 2 * (slot * hd + d))));
        layer.dense_values[slot * hd + d] = FloatToBf16(NoiseValue(NoiseBits(fill.seed, 2 * (slot * hd + d) + 1)));
      }
      layer.dense_positions[slot] = length - dense + e;
      if (layer.dense_scores) layer.dense_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 1, slot)) + 0.5f;
      if (layer.dense_selected) layer.dense_selected[slot] = e < selected;
    }
    if (layer.coded_count == nullptr) continue;
    layer.coded_count[i] = coded;
    for (int e = 0; e < coded; ++e) {
      const int64_t slot = layer.coded_begin[i] + e;
      for (int c = 0; c < sk + sv; ++c) {
        const uint32_t bits = NoiseBits(fill.seed ^ 2, slot * (sk + sv) + c);
        const uint32_t code = PackCode(uint16_t(bits % uint32_t(fill.atoms)), FloatToFp16(NoiseValue(bits)));
        if (c < sk)
          layer.key_codes[slot * sk + c] = code;
        else
          layer.value_codes[slot * sv + c - sk] = code;
      }
      layer.coded_positions[slot] = length - dense - coded + e;
      if (layer.coded_scores) layer.coded_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 3, slot)) + 0.5f;
      if (layer.coded_selected) layer.coded_selected[slot] = dense + e < selected;
    }
  }
  if (layer.merged_tokens == nullptr) return;
  for (int i = 0; i < layer.head_slots; ++i) {
    const int32_t kept = fill.dense[i] + (layer.coded_count ? fill.coded[i] : 0);
    layer.merged_tokens[i] = fill.merged[i] ? float(fill.lengths[i / layer.kv_heads] - kept) : 0.0f;
    for (int d = 0; d < hd; ++d) {
      layer.merged_keys[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 4, int64_t(i) * hd + d));
      layer.merged_values[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 5, int64_t(i) * hd + d));
    }
  }
}

}  // namespace kvplan::cpu
