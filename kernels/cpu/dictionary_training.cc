#include "kernels/cpu/dictionary_training.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/compressed/coding.h"

namespace kvplan::cpu {

void group_by_key(const uint16_t* keys, int entries, int key_count, int32_t* order, int32_t* segment_begin) {
  std::vector<int32_t> next(key_count + 1, 0);
  for (int e = 0; e < entries; ++e) ++next[keys[e] + 1];
  for (int k = 0; k < key_count; ++k) next[k + 1] += next[k];
  std::copy(next.begin(), next.end(), segment_begin);
  for (int e = 0; e < entries; ++e) order[next[keys[e]]++] = e;
}

void squared_norms(const float* rows, int64_t n, int dim, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int d = 0; d < dim; ++d) sum += double(rows[i * dim + d]) * rows[i * dim + d];
    out[i] = float(sum);
  }
}

void nearest_centroids(const float* products, const float* centroid_squared_norms, int64_t n, int clusters,
                       uint16_t* assignment) {
  for (int64_t i = 0; i < n; ++i) {
    int best = 0;
    float best_distance = centroid_squared_norms[0] - 2.0f * products[i * clusters];
    for (int c = 1; c < clusters; ++c) {
      const float distance = centroid_squared_norms[c] - 2.0f * products[i * clusters + c];
      if (distance < best_distance) {
        best = c;
        best_distance = distance;
      }
    }
    assignment[i] = uint16_t(best);
  }
}

void update_centroids(const float* x, int64_t n, int dim, const uint16_t* assignment, int clusters, float* centroids) {
  std::vector<double> sums(int64_t(clusters) * dim, 0.0);
  std::vector<int64_t> counts(clusters, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++counts[assignment[i]];
    for (int d = 0; d < dim; ++d) sums[int64_t(assignment[i]) * dim + d] += x[i * dim + d];
  }
  for (int c = 0; c < clusters; ++c)
    if (counts[c] > 0)
      for (int d = 0; d < dim; ++d)
        centroids[int64_t(c) * dim + d] = float(sums[int64_t(c) * dim + d] / double(counts[c]));
}

void pursuit_step(const float* correlations, const float* dictionary, int64_t n, int atoms, int dim, int step,
                  int sparsity, float* residual, uint16_t* indices, float* coefficients) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = correlations + i * atoms;
    int best = 0;
    for (int a = 1; a < atoms; ++a)
      if (std::fabs(row[a]) > std::fabs(row[best])) best = a;
    const float coefficient = round_to_fp16(row[best]);
    indices[i * sparsity + step] = uint16_t(best);
    coefficients[i * sparsity + step] = coefficient;
    for (int d = 0; d < dim; ++d) residual[i * dim + d] -= coefficient * dictionary[int64_t(best) * dim + d];
  }
}

void update_atoms(const float* residual, int64_t n, const uint16_t* indices, const float* coefficients, int sparsity,
                  int atoms, int dim, float* dictionary) {
  std::vector<double> step(int64_t(atoms) * dim, 0.0), weight(atoms, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int s = 0; s < sparsity; ++s) {
      const int a = indices[i * sparsity + s];
      const float c = coefficients[i * sparsity + s];
      weight[a] += double(c) * c;
      for (int d = 0; d < dim; ++d) step[int64_t(a) * dim + d] += c * residual[i * dim + d];
    }
  for (int a = 0; a < atoms; ++a)
    if (weight[a] > 0)
      for (int d = 0; d < dim; ++d) dictionary[int64_t(a) * dim + d] += float(step[int64_t(a) * dim + d] / weight[a]);
}

void normalise_atoms(float* dictionary, int atoms, int dim) {
  for (int64_t a = 0; a < atoms; ++a) {
    float* atom = dictionary + a * dim;
    double norm = 0;
    for (int d = 0; d < dim; ++d) norm += double(atom[d]) * atom[d];
    const float inverse = norm > 1e-20 ? float(1.0 / std::sqrt(norm)) : 0.0f;
    for (int d = 0; d < dim; ++d) atom[d] *= inverse;
    if (inverse == 0.0f) atom[a % dim] = 1.0f;
  }
}

}  // namespace kvplan::cpu
