// CPU oracles of the calibration statistics kernels (kernels/cuda/calibration_statistics.h), one per kernel of the
// same name; calibration on the CPU runs them itself.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// For each query row t in [first_query, rows) and query head h: the fraction of positions 0..t that holds `mass`
// of the head's causal attention (the fewest largest probabilities whose sum reaches mass times their total).
// q: [rows, heads, head_dim] and k: [rows, kv_heads, head_dim], both after RoPE; out: [rows - first_query, heads].
void attention_coverage(const float* q, const float* k, int rows, int heads, int kv_heads, int head_dim,
                        int first_query, float mass, float* out);

// sums[c] += x[0, c] + ... + x[rows - 1, c], in double, in row order. x: [rows, cols].
void add_column_sums(const float* x, int rows, int cols, double* sums);

// out[i, :] = x[indices[i], :]. x: [*, dim]; out: [count, dim].
void gather_rows(const float* x, const int32_t* indices, int count, int dim, float* out);

}  // namespace kvplan::cpu
