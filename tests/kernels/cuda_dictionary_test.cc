// The dictionary training kernels (kernels/cuda/dictionary_training.h) against their CPU oracles
// (kernels/cpu/dictionary_training.h) on random inputs of odd shapes. Each kernel repeats its oracle's floating-point
// operations in the same order, so every output must match exactly (kExact): indices and orders as integers,
// values to the bit. Quantised inputs put many exact ties in the argmin / argmax kernels, whose rule (the lowest
// index wins) must then match too.
#include <algorithm>
#include <cmath>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/cpu/compressed/coding.h"
#include "kernels/cpu/dictionary_training.h"
#include "kernels/cuda/dictionary_training.h"
#include "tests/testing/cuda_test_util.h"
#include "tests/testing/tolerance.h"

namespace kvplan {
namespace {

using testing::AllClose;
using testing::Device;
using testing::RandomVector;
using testing::Tolerance;

constexpr Tolerance kExact{.atol = 0, .rtol = 0};

std::vector<uint16_t> RandomKeys(int n, int key_count, uint32_t seed) {
  std::mt19937 generator(seed);
  // Half the entries share one key, so segments have very different lengths and some keys stay empty.
  std::uniform_int_distribution<int> key(0, key_count - 1);
  std::vector<uint16_t> keys(n);
  for (int e = 0; e < n; ++e) keys[e] = uint16_t(e % 2 == 0 ? key_count / 2 : key(generator));
  return keys;
}

// Multiples of 1/4: many exact ties between distances or correlations.
std::vector<float> Quantised(std::vector<float> values) {
  for (float& value : values) value = std::round(value * 4.0f) / 4.0f;
  return values;
}

std::vector<float> UnitRows(int rows, int dim, uint32_t seed) {
  std::vector<float> values = RandomVector(size_t(rows) * dim, seed);
  cpu::normalise_atoms(values.data(), rows, dim);
  return values;
}

// The grouping on the device, as the kernels that take it need it.
struct DeviceGroups {
  DeviceGroups(const uint16_t* keys, int entries, int key_count)
      : workspace(cuda::group_by_key_workspace_bytes(entries)), order(entries), segment_begin(key_count + 1) {
    EXPECT_EQ(cuda::group_by_key(keys, entries, key_count, workspace.get(), cuda::group_by_key_workspace_bytes(entries),
                                 order.get(), segment_begin.get(), nullptr),
              cudaSuccess);
  }
  Device<uint8_t> workspace;
  Device<int32_t> order;
  Device<int32_t> segment_begin;
};

TEST(CudaDictionaryTest, GroupByKeyMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [entries, key_count] :
       {std::tuple{0, 5}, {1, 1}, {37, 7}, {100, 4096}, {5003, 1000}, {118001, 4096}, {70001, 65536}}) {
    SCOPED_TRACE(::testing::Message() << entries << " entries, " << key_count << " keys");
    const std::vector<uint16_t> keys = RandomKeys(entries, key_count, 11);
    std::vector<int32_t> order(entries), segment_begin(key_count + 1);
    cpu::group_by_key(keys.data(), entries, key_count, order.data(), segment_begin.data());
    Device<uint16_t> d_keys(keys);
    DeviceGroups groups(d_keys.get(), entries, key_count);
    EXPECT_EQ(groups.order.Read(), order);
    EXPECT_EQ(groups.segment_begin.Read(), segment_begin);
  }
}

TEST(CudaDictionaryTest, SquaredNormsMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [n, dim] : {std::tuple{1, 64}, {7, 128}, {1000, 64}, {4099, 128}, {33, 37}}) {
    SCOPED_TRACE(::testing::Message() << n << " x " << dim);
    const std::vector<float> rows = RandomVector(size_t(n) * dim, 12, 3.0f);
    std::vector<float> expected(n);
    cpu::squared_norms(rows.data(), n, dim, expected.data());
    Device<float> d_rows(rows), out(n);
    ASSERT_EQ(cuda::squared_norms(d_rows.get(), n, dim, out.get(), nullptr), cudaSuccess);
    EXPECT_TRUE(AllClose(out.Read(), expected, kExact));
  }
}

TEST(CudaDictionaryTest, NearestCentroidsMatchCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (bool quantised : {false, true})
    for (auto [n, clusters] : {std::tuple{1, 1}, {333, 7}, {4099, 1000}, {257, 4096}}) {
      SCOPED_TRACE(::testing::Message() << n << " rows, " << clusters << " clusters, quantised " << quantised);
      std::vector<float> products = RandomVector(size_t(n) * clusters, 13);
      std::vector<float> norms = RandomVector(clusters, 14);
      for (float& norm : norms) norm = std::fabs(norm);
      if (quantised) {
        products = Quantised(products);
        norms = Quantised(norms);
      }
      std::vector<uint16_t> expected(n);
      cpu::nearest_centroids(products.data(), norms.data(), n, clusters, expected.data());
      Device<float> d_products(products), d_norms(norms);
      Device<uint16_t> assignment(n);
      ASSERT_EQ(cuda::nearest_centroids(d_products.get(), d_norms.get(), n, clusters, assignment.get(), nullptr),
                cudaSuccess);
      EXPECT_EQ(assignment.Read(), expected);
    }
}

TEST(CudaDictionaryTest, UpdateCentroidsMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [n, dim, clusters] :
       {std::tuple{1, 64, 1}, {7, 128, 7}, {1013, 64, 1000}, {5000, 128, 7}, {3001, 128, 1000}, {50, 37, 64}}) {
    SCOPED_TRACE(::testing::Message() << n << " x " << dim << ", " << clusters << " clusters");
    const std::vector<float> x = RandomVector(size_t(n) * dim, 15);
    const std::vector<uint16_t> assignment = RandomKeys(n, clusters, 16);
    std::vector<float> expected = RandomVector(size_t(clusters) * dim, 17);  // empty clusters keep these
    Device<float> d_x(x), centroids(expected);
    cpu::update_centroids(x.data(), n, dim, assignment.data(), clusters, expected.data());
    Device<uint16_t> d_assignment(assignment);
    DeviceGroups groups(d_assignment.get(), n, clusters);
    ASSERT_EQ(cuda::update_centroids(d_x.get(), dim, groups.order.get(), groups.segment_begin.get(), clusters,
                                     centroids.get(), nullptr),
              cudaSuccess);
    EXPECT_TRUE(AllClose(centroids.Read(), expected, kExact));
  }
}

TEST(CudaDictionaryTest, PursuitStepMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  constexpr int kSparsity = 5, kStep = 3;  // the other slots of the codes must stay as they were
  for (bool quantised : {false, true})
    for (auto [n, dim, atoms] : {std::tuple{1, 64, 1}, {333, 128, 7}, {2049, 64, 1000}, {301, 128, 4096}}) {
      SCOPED_TRACE(::testing::Message() << n << " x " << dim << ", " << atoms << " atoms, quantised " << quantised);
      std::vector<float> correlations = RandomVector(size_t(n) * atoms, 18, 100.0f);
      if (quantised) correlations = Quantised(correlations);
      const std::vector<float> dictionary = UnitRows(atoms, dim, 19);
      std::vector<float> residual = RandomVector(size_t(n) * dim, 20);
      std::vector<float> coefficients = RandomVector(size_t(n) * kSparsity, 21);
      std::vector<uint16_t> indices = RandomKeys(n * kSparsity, atoms, 22);
      Device<float> d_correlations(correlations), d_dictionary(dictionary), d_residual(residual),
          d_coefficients(coefficients);
      Device<uint16_t> d_indices(indices);
      cpu::pursuit_step(correlations.data(), dictionary.data(), n, atoms, dim, kStep, kSparsity, residual.data(),
                        indices.data(), coefficients.data());
      ASSERT_EQ(cuda::pursuit_step(d_correlations.get(), d_dictionary.get(), n, atoms, dim, kStep, kSparsity,
                                   d_residual.get(), d_indices.get(), d_coefficients.get(), nullptr),
                cudaSuccess);
      EXPECT_EQ(d_indices.Read(), indices);
      EXPECT_TRUE(AllClose(d_coefficients.Read(), coefficients, kExact));
      EXPECT_TRUE(AllClose(d_residual.Read(), residual, kExact));
    }
}

TEST(CudaDictionaryTest, UpdateAtomsMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [n, dim, atoms, sparsity] :
       {std::tuple{1, 64, 1, 1}, {333, 128, 7, 8}, {2049, 64, 1000, 8}, {1013, 128, 1000, 3}, {4000, 128, 4096, 8}}) {
    SCOPED_TRACE(::testing::Message() << n << " x " << dim << ", " << atoms << " atoms, sparsity " << sparsity);
    const std::vector<float> residual = RandomVector(size_t(n) * dim, 23);
    const std::vector<uint16_t> indices = RandomKeys(n * sparsity, atoms, 24);
    std::vector<float> coefficients = RandomVector(size_t(n) * sparsity, 25);
    // fp16 coefficients as pursuit makes them; every seventh zero, as a tiny correlation rounds to
    for (size_t e = 0; e < coefficients.size(); ++e)
      coefficients[e] = e % 7 == 3 ? 0.0f : cpu::round_to_fp16(coefficients[e]);
    std::vector<float> expected = UnitRows(atoms, dim, 26);
    Device<float> d_residual(residual), d_coefficients(coefficients), dictionary(expected);
    cpu::update_atoms(residual.data(), n, indices.data(), coefficients.data(), sparsity, atoms, dim, expected.data());
    Device<uint16_t> d_indices(indices);
    DeviceGroups groups(d_indices.get(), n * sparsity, atoms);
    ASSERT_EQ(cuda::update_atoms(d_residual.get(), d_coefficients.get(), sparsity, groups.order.get(),
                                 groups.segment_begin.get(), atoms, dim, dictionary.get(), nullptr),
              cudaSuccess);
    EXPECT_TRUE(AllClose(dictionary.Read(), expected, kExact));
  }
}

TEST(CudaDictionaryTest, NormaliseAtomsMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [atoms, dim] : {std::tuple{1, 64}, {7, 128}, {1000, 64}, {4096, 128}, {9, 37}}) {
    SCOPED_TRACE(::testing::Message() << atoms << " x " << dim);
    std::vector<float> expected = RandomVector(size_t(atoms) * dim, 27, 5.0f);
    std::fill_n(expected.begin() + (atoms / 2) * dim, dim, 0.0f);  // a dead atom becomes a basis vector
    Device<float> dictionary(expected);
    cpu::normalise_atoms(expected.data(), atoms, dim);
    ASSERT_EQ(cuda::normalise_atoms(dictionary.get(), atoms, dim, nullptr), cudaSuccess);
    EXPECT_TRUE(AllClose(dictionary.Read(), expected, kExact));
  }
}

}  // namespace
}  // namespace kvplan
