#include "kernels/cpu/compressed/common.h"

#include <algorithm>

#include "kernels/cpu/compressed/coding.h"
#include "kernels/cpu/elementwise.h"

namespace kvplan::cpu {

void DecodeCodedEntry(const CompressedLayer& layer, const CodingTables& tables, int kv_head, int64_t slot, float* key,
                      float* value) {
  const int hd = layer.head_dim;
  if (tables.key_bits > 0) {
    dequantize_vector(layer.key_codes + slot * layer.key_sparsity, hd, tables.key_bits,
                      tables.key_channel_scale + int64_t(kv_head) * hd, key);
    dequantize_vector(layer.value_codes + slot * layer.value_sparsity, hd, tables.value_bits, nullptr, value);
    return;
  }
  decode_codes(tables.key_atoms, hd, layer.key_codes + slot * layer.key_sparsity, layer.key_sparsity, key);
  if (!tables.keys_after_rope)
    apply_rope(key, layer.coded_positions + slot, tables.inv_freq, 1, 1, hd, tables.rope_attention_factor);
  decode_codes(tables.value_atoms, hd, layer.value_codes + slot * layer.value_sparsity, layer.value_sparsity, value);
}

void MoveDenseSlot(const CompressedLayer& layer, int64_t from, int64_t to) {
  const int hd = layer.head_dim;
  std::copy_n(layer.dense_keys + from * hd, hd, layer.dense_keys + to * hd);
  std::copy_n(layer.dense_values + from * hd, hd, layer.dense_values + to * hd);
  layer.dense_positions[to] = layer.dense_positions[from];
  if (layer.dense_scores) layer.dense_scores[to] = layer.dense_scores[from];
  if (layer.dense_selected) layer.dense_selected[to] = layer.dense_selected[from];
}

void MoveCodedSlot(const CompressedLayer& layer, int64_t from, int64_t to) {
  std::copy_n(layer.key_codes + from * layer.key_sparsity, layer.key_sparsity,
              layer.key_codes + to * layer.key_sparsity);
  std::copy_n(layer.value_codes + from * layer.value_sparsity, layer.value_sparsity,
              layer.value_codes + to * layer.value_sparsity);
  layer.coded_positions[to] = layer.coded_positions[from];
  if (layer.coded_scores) layer.coded_scores[to] = layer.coded_scores[from];
  if (layer.coded_selected) layer.coded_selected[to] = layer.coded_selected[from];
}

std::vector<std::pair<int, int>> CompactionMoves(const uint8_t* removed, int live) {
  const int remaining = live - int(std::count(removed, removed + live, uint8_t(1)));
  std::vector<int> holes, movers;
  for (int i = 0; i < remaining; ++i)
    if (removed[i]) holes.push_back(i);
  for (int i = remaining; i < live; ++i)
    if (!removed[i]) movers.push_back(i);
  std::vector<std::pair<int, int>> moves;
  for (size_t t = 0; t < holes.size(); ++t) moves.push_back({movers[t], holes[t]});
  return moves;
}

}  // namespace kvplan::cpu
