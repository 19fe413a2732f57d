// CUDA kernels of dictionary training (calibrate/cuda/dictionary_learning_cuda.cc drives them around cuBLAS
// GEMMs): k-means initialisation by Lloyd iterations, then matching pursuit and the per-atom dictionary step.
// Raw pointers in, cudaError_t out. Each kernel's CPU oracle is the function of the same name in
// kernels/cpu/dictionary_training.h; the oracles take the assignment or the codes directly where a kernel takes
// them grouped by group_by_key.
//
// Layouts (row-major): vectors x and residuals [n, dim]; dictionary and centroids [atoms, dim];
// products and correlations [n, atoms] (row i against every atom, as one GEMM makes them); codes [n, sparsity].
// Entry e = i * sparsity + s of the codes is vector i's s-th atom.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvplan::cuda {

// Workspace bytes group_by_key needs for `entries` keys.
size_t group_by_key_workspace_bytes(int entries);

// Groups entries by key, deterministically (a stable sort): order ([entries]) lists entry ids by key, ties in
// entry order, and the entries of key k are order[segment_begin[k] .. segment_begin[k + 1]) (segment_begin:
// [key_count + 1]). Every key must be below key_count.
cudaError_t group_by_key(const uint16_t* keys, int entries, int key_count, void* workspace, size_t workspace_bytes,
                         int32_t* order, int32_t* segment_begin, cudaStream_t stream);

// out[i] = sum_d rows[i, d]^2, summed in double in d order.
cudaError_t squared_norms(const float* rows, int64_t n, int dim, float* out, cudaStream_t stream);

// assignment[i] = argmin_c centroid_squared_norms[c] - 2 products[i, c] (the squared distance less |x_i|^2), the
// lowest c on ties. products: x . centroids^T.
cudaError_t nearest_centroids(const float* products, const float* centroid_squared_norms, int64_t n, int clusters,
                              uint16_t* assignment, cudaStream_t stream);

// centroids[c] = the mean of the vectors assigned to c (summed in double, in vector order); a cluster without
// vectors keeps its centroid. order, segment_begin: group_by_key of the assignment.
cudaError_t update_centroids(const float* x, int dim, const int32_t* order, const int32_t* segment_begin, int clusters,
                             float* centroids, cudaStream_t stream);

// One matching-pursuit step for every vector: the atom of largest |correlations[i, a]| (the lowest a on ties) is
// code `step` of vector i (indices and coefficients: [n, sparsity]), with its correlation rounded to fp16 as the
// coefficient, and residual[i] -= coefficient * atom. correlations: residual . dictionary^T.
cudaError_t pursuit_step(const float* correlations, const float* dictionary, int64_t n, int atoms, int dim, int step,
                         int sparsity, float* residual, uint16_t* indices, float* coefficients, cudaStream_t stream);

// The dictionary step of training: atom a += sum c * residual[i] / sum c^2 over the codes (i, c) that use it,
// summed in double in entry order; an unused atom stays. residual: the vectors' residuals after coding; order,
// segment_begin: group_by_key of the codes' indices.
cudaError_t update_atoms(const float* residual, const float* coefficients, int sparsity, const int32_t* order,
                         const int32_t* segment_begin, int atoms, int dim, float* dictionary, cudaStream_t stream);

// Scales every atom to unit length (norm summed in double); an atom of zero length becomes basis vector a % dim.
cudaError_t normalise_atoms(float* dictionary, int atoms, int dim, cudaStream_t stream);

}  // namespace kvplan::cuda
