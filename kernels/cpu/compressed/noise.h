// CPU oracle of the benchmarks' noise fill of a compressed layer (kernels/cuda/compressed/noise.cu), writing the
// arrays of kernels/compressed_layout.h as the CUDA kernel of the same name does.
#pragma once

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// Benchmarks: the storage a sequence of fill.lengths[s] tokens could leave, without running the model: each head
// slot holds its newest fill.dense[i] positions as dense entries and the fill.coded[i] before them as codes, its
// merged slot (when fill.merged[i]) the older tokens, and its first fill.selected[i] entries (dense, then coded)
// selected; keys, values, codes and scores are NoiseBits of the entry's index.
void fill_compressed_noise(const CompressedLayer& layer, const NoiseFill& fill);

}  // namespace kvplan::cpu
