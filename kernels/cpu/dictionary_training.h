// CPU oracles of the dictionary training kernels (kernels/cuda/dictionary_training.h), one per kernel of the same
// name, with the same floating-point operations in the same order. calibrate's CPU trainer runs update_atoms and
// normalise_atoms itself. Layouts as in that header.
#pragma once

#include <cstdint>

namespace kvplan::cpu {

// A stable counting sort: order lists entry ids by key, ties in entry order; key k's entries are
// order[segment_begin[k] .. segment_begin[k + 1]).
void group_by_key(const uint16_t* keys, int entries, int key_count, int32_t* order, int32_t* segment_begin);

// out[i] = sum_d rows[i, d]^2, in double.
void squared_norms(const float* rows, int64_t n, int dim, float* out);

// assignment[i] = argmin_c centroid_squared_norms[c] - 2 products[i, c], the lowest c on ties.
void nearest_centroids(const float* products, const float* centroid_squared_norms, int64_t n, int clusters,
                       uint16_t* assignment);

// centroids[c] = the mean (in double) of the rows of x assigned to c; a cluster without rows keeps its centroid.
void update_centroids(const float* x, int64_t n, int dim, const uint16_t* assignment, int clusters, float* centroids);

// Matching-pursuit step `step` of every vector (cpu::matching_pursuit's choice, coefficient and residual update,
// from given correlations = residual . dictionary^T).
void pursuit_step(const float* correlations, const float* dictionary, int64_t n, int atoms, int dim, int step,
                  int sparsity, float* residual, uint16_t* indices, float* coefficients);

// The dictionary step: atom a += sum c * residual[i] / sum c^2 over the codes (i, c) that use it (in double, in
// code order); an atom without codes, or with only zero coefficients, stays.
void update_atoms(const float* residual, int64_t n, const uint16_t* indices, const float* coefficients, int sparsity,
                  int atoms, int dim, float* dictionary);

// Scales every atom to unit length; an atom of zero length becomes basis vector a % dim.
void normalise_atoms(float* dictionary, int atoms, int dim);

}  // namespace kvplan::cpu
