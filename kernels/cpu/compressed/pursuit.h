// CPU oracles of matching pursuit (kernels/cuda/compressed/pursuit.cu), the one-vector encoder every sparse code
// must agree with, and its decoder.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// Matching pursuit of x ([dim]) over unit-norm atoms ([atoms, dim]): `sparsity` times, pick the atom with the
// largest |<residual, atom>| and subtract its projection. Coefficients are rounded to fp16, the precision
// they are stored in, before the residual is updated. Writes indices and coefficients ([sparsity]).
void matching_pursuit(const float* dictionary, int atoms, int dim, const float* x, int sparsity, uint16_t* indices,
                      float* coefficients);

// out[dim] = sum_i coefficients[i] * dictionary[indices[i], :]
void decode_sparse(const float* dictionary, int dim, const uint16_t* indices, const float* coefficients, int sparsity,
                   float* out);

// A (atom, coefficient) pair packed as kernels/compressed_layout.h stores it.
uint32_t pack_code(uint16_t atom, float coefficient);

}  // namespace kvplan::cpu
