// CPU oracles of the elementwise kernels (kernels/cuda/elementwise.cu), one per kernel of the same name. They are
// what the CUDA kernels are tested against and the CPU runtime's execution path, so they favour clarity and fp32
// accuracy.
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

// Benchmarks: out[i] = bf16(2 * NoiseValue(NoiseBits(seed, i))) (kernels/compressed_layout.h), about unit scale.
void fill_noise_bf16(uint16_t* out, int64_t n, uint32_t seed);

// x[r, :] += bias.
void add_row_bias(float* x, const float* bias, int64_t rows, int dim);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, ffn + i]: gate and up projections stacked in one row
// ([rows, 2 ffn], as one GEMM makes them); out: [rows, ffn].
void swiglu(const float* gate_up, int64_t rows, int ffn, float* out);

}  // namespace kvplan::cpu
