// For tests built only with CUDA: they skip, not fail, on a machine without a device; device copies of host data
// with poisoned outputs and readback.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <random>
#include <vector>

#include "base/number_formats.h"
#include "gtest/gtest.h"
#include "kernels/cuda/kernels.h"

#define KVPLAN_SKIP_WITHOUT_GPU() \
  if (!::kvplan::cuda::device_available()) GTEST_SKIP() << "no CUDA device"

namespace kvplan::testing {

inline std::vector<float> RandomVector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(n);
  for (float& value : values) value = normal(generator);
  return values;
}

inline std::vector<uint16_t> ToBf16(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = FloatToBf16(values[i]);
  return out;
}

inline std::vector<float> RoundToBf16(const std::vector<float>& values) {
  std::vector<float> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = ::kvplan::RoundToBf16(values[i]);
  return out;
}

// A device copy of a host vector (or n poisoned elements: all bits set, NaN for floats, so unwritten outputs
// fail), read back whole.
template <typename T>
class Device {
 public:
  explicit Device(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&data_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemset(data_, 0xff, n * sizeof(T)), cudaSuccess);
  }
  explicit Device(const std::vector<T>& host) : Device(host.size()) {
    EXPECT_EQ(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() { cudaFree(data_); }
  T* get() { return data_; }
  std::vector<T> Read() const {
    std::vector<T> host(n_);
    EXPECT_EQ(cudaMemcpy(host.data(), data_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t n_;
};

inline std::vector<float> ReadBf16(const Device<uint16_t>& device) {
  std::vector<float> out;
  for (uint16_t bits : device.Read()) out.push_back(Bf16ToFloat(bits));
  return out;
}

inline __nv_bfloat16* AsBf16(Device<uint16_t>& device) { return reinterpret_cast<__nv_bfloat16*>(device.get()); }

}  // namespace kvplan::testing
