// CUDA kernels of calibration's statistics: what calibration learns from each layer's queries, keys and values
// is reduced on the device, so only small results travel to the host. Raw pointers in, cudaError_t out. Each
// kernel's CPU oracle is the function of the same name in kernels/cpu/calibration_statistics.h (layouts as there).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvplan::cuda {

// Positions one attention_coverage block can score (its probabilities are sorted in shared memory).
constexpr int kMaxCoverageRows = 16384;

// cpu::attention_coverage; rows <= kMaxCoverageRows. Each (query, head) pair sums its probabilities in float, so
// a count near the mass boundary may differ from the oracle's (double) by one position.
cudaError_t attention_coverage(const float* q, const float* k, int rows, int heads, int kv_heads, int head_dim,
                               int first_query, float mass, float* out, cudaStream_t stream);

// cpu::add_column_sums.
cudaError_t add_column_sums(const float* x, int rows, int cols, double* sums, cudaStream_t stream);

// cpu::gather_rows.
cudaError_t gather_rows(const float* x, const int32_t* indices, int count, int dim, float* out, cudaStream_t stream);

}  // namespace kvplan::cuda
