// fill_compressed_noise (the oracle: cpu/compressed/noise.cc): a layer's arrays filled with deterministic noise in
// the amounts a benchmark asks for.
#include <cstdint>

#include "kernels/cuda/compressed/common.cuh"
#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {
namespace {

// Grid (head slots).
__global__ void fill_compressed_noise_kernel(CompressedLayer layer, NoiseFill fill) {
  const int i = blockIdx.x, hd = layer.head_dim, sk = layer.key_sparsity, sv = layer.value_sparsity;
  const int32_t length = fill.lengths[i / layer.kv_heads], dense = fill.dense[i];
  const int coded = layer.coded_count ? fill.coded[i] : 0;
  const int selected = fill.selected ? fill.selected[i] : 0;
  if (threadIdx.x == 0) {
    layer.dense_count[i] = dense;
    if (layer.coded_count) layer.coded_count[i] = coded;
    if (layer.merged_tokens) layer.merged_tokens[i] = fill.merged[i] ? float(length - dense - coded) : 0.0f;
  }
  for (int64_t index = threadIdx.x; index < int64_t(dense) * hd; index += blockDim.x) {
    const int64_t slot = layer.dense_begin[i] + index / hd, element = slot * hd + index % hd;
    layer.dense_keys[element] = bf16_bits(2.0f * NoiseValue(NoiseBits(fill.seed, 2 * element)));
    layer.dense_values[element] = bf16_bits(NoiseValue(NoiseBits(fill.seed, 2 * element + 1)));
    if (index % hd != 0) continue;
    const int e = int(index / hd);
    layer.dense_positions[slot] = length - dense + e;
    if (layer.dense_scores) layer.dense_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 1, slot)) + 0.5f;
    if (layer.dense_selected) layer.dense_selected[slot] = e < selected;
  }
  for (int64_t index = threadIdx.x; index < int64_t(coded) * (sk + sv); index += blockDim.x) {
    const int64_t slot = layer.coded_begin[i] + index / (sk + sv);
    const int c = int(index % (sk + sv));
    const uint32_t bits = NoiseBits(fill.seed ^ 2, slot * (sk + sv) + c);
    const uint32_t code = PackCode(uint16_t(bits % uint32_t(fill.atoms)), saturated_fp16_bits(NoiseValue(bits)));
    if (c < sk)
      layer.key_codes[slot * sk + c] = code;
    else
      layer.value_codes[slot * sv + c - sk] = code;
    if (c != 0) continue;
    const int e = int(index / (sk + sv));
    layer.coded_positions[slot] = length - dense - coded + e;
    if (layer.coded_scores) layer.coded_scores[slot] = NoiseValue(NoiseBits(fill.seed ^ 3, slot)) + 0.5f;
    if (layer.coded_selected) layer.coded_selected[slot] = dense + e < selected;
  }
  if (layer.merged_tokens == nullptr) return;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    layer.merged_keys[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 4, int64_t(i) * hd + d));
    layer.merged_values[int64_t(i) * hd + d] = NoiseValue(NoiseBits(fill.seed ^ 5, int64_t(i) * hd + d));
  }
}

}  // namespace

cudaError_t fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill, cudaStream_t stream) {
  if (layer.head_slots == 0) return cudaSuccess;
  fill_compressed_noise_kernel<<<layer.head_slots, kBlock, 0, stream>>>(layer, fill);
  return cudaGetLastError();
}

}  // namespace kvplan::cuda
