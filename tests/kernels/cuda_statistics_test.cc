// The calibration statistics kernels against their CPU oracles on random inputs, odd shapes included. Coverage:
// within one position of the oracle's count per (query, head) (the kernel sums probabilities in float, the oracle
// in double, so a count on the mass boundary may move by one); column sums and gathers: exact.
#include "kernels/cuda/calibration_statistics.h"

#include <cmath>
#include <tuple>

#include "kernels/cpu/calibration_statistics.h"
#include "tests/testing/cuda_test_util.h"

namespace kvplan {
namespace {

using testing::Device;
using testing::RandomVector;

TEST(CudaStatisticsTest, AttentionCoverageMatchesCpu) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [rows, heads, kv_heads, head_dim, queries] : {std::tuple{37, 4, 2, 64, 5},
                                                          {300, 32, 8, 128, 32},
                                                          {2048, 4, 2, 64, 32},
                                                          {1, 2, 1, 64, 1},
                                                          {129, 6, 3, 128, 129}}) {
    // Keys at scale 2 make some heads sharp and some flat, as real attention is.
    const std::vector<float> q = RandomVector(size_t(rows) * heads * head_dim, 41, 1.0f);
    const std::vector<float> k = RandomVector(size_t(rows) * kv_heads * head_dim, 42, 2.0f);
    const int first_query = rows - queries;
    std::vector<float> expected(size_t(queries) * heads);
    cpu::attention_coverage(q.data(), k.data(), rows, heads, kv_heads, head_dim, first_query, 0.9f, expected.data());
    Device<float> d_q(q), d_k(k), d_out(expected.size());
    ASSERT_EQ(cuda::attention_coverage(d_q.get(), d_k.get(), rows, heads, kv_heads, head_dim, first_query, 0.9f,
                                       d_out.get(), nullptr),
              cudaSuccess);
    const std::vector<float> actual = d_out.Read();
    for (int i = 0; i < queries; ++i)
      for (int h = 0; h < heads; ++h) {
        const float one_position = 1.0f / float(first_query + i + 1);
        EXPECT_NEAR(actual[size_t(i) * heads + h], expected[size_t(i) * heads + h], one_position * 1.001f)
            << rows << " rows, query " << i << ", head " << h;
      }
  }
}

TEST(CudaStatisticsTest, ColumnSumsAndGathersMatchCpuExactly) {
  KVPLAN_SKIP_WITHOUT_GPU();
  for (auto [rows, cols] : {std::pair{333, 1000}, {1, 7}, {2048, 128}}) {
    const std::vector<float> x = RandomVector(size_t(rows) * cols, 43, 3.0f);
    std::vector<double> expected(cols, 0.5);  // the sums add to what is there
    cpu::add_column_sums(x.data(), rows, cols, expected.data());
    Device<float> d_x(x);
    Device<double> d_sums(std::vector<double>(cols, 0.5));
    ASSERT_EQ(cuda::add_column_sums(d_x.get(), rows, cols, d_sums.get(), nullptr), cudaSuccess);
    EXPECT_EQ(d_sums.Read(), expected);

    std::vector<int32_t> indices;
    for (int i = 0; i < rows; i += 3) indices.push_back((i * 7) % rows);
    std::vector<float> gathered(indices.size() * cols);
    cpu::gather_rows(x.data(), indices.data(), int(indices.size()), cols, gathered.data());
    Device<int32_t> d_indices(indices);
    Device<float> d_gathered(gathered.size());
    ASSERT_EQ(cuda::gather_rows(d_x.get(), d_indices.get(), int(indices.size()), cols, d_gathered.get(), nullptr),
              cudaSuccess);
    EXPECT_EQ(d_gathered.Read(), gathered);
  }
}

}  // namespace
}  // namespace kvplan
