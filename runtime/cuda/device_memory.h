// Owning device and pinned-host allocations, and CUDA / cuBLAS errors as absl::Status: what the CUDA runtime's
// files share.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace kvplan {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorString(error)));
}

inline absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuBLAS error in ", what, ": ", cublasGetStatusString(status)));
}

#define KVPLAN_CUDA(call) KVPLAN_RETURN_IF_ERROR(::kvplan::CudaStatus((call), #call))

// An owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) { other.data_ = nullptr; }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  absl::Status Allocate(size_t bytes) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    bytes_ = bytes;
    const cudaError_t error = cudaMalloc(&data_, std::max<size_t>(bytes, 1));
    if (error != cudaSuccess) {
      cudaGetLastError();  // an allocation failure must not be reported again by the next launch's check
      data_ = nullptr;
      bytes_ = 0;
      return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes: ", cudaGetErrorString(error)));
    }
    return absl::OkStatus();
  }
  // Allocates and copies a host vector (synchronously: for data that lives as long as the model).
  template <typename T>
  absl::Status Upload(const std::vector<T>& values) {
    KVPLAN_RETURN_IF_ERROR(Allocate(values.size() * sizeof(T)));
    return CudaStatus(cudaMemcpy(data_, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice),
                      "cudaMemcpy");
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  // Null for an empty buffer: the layout's "this array is absent".
  template <typename T>
  T* as_or_null() const {
    return bytes_ == 0 ? nullptr : static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory: asynchronous copies from it, and copies captured into a CUDA graph, read it when they
// run, so a step's metadata is written here and then replayed.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  absl::Status Allocate(size_t bytes) {
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
    bytes_ = bytes;
    return CudaStatus(cudaMallocHost(&data_, std::max<size_t>(bytes, 1)), "cudaMallocHost");
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace kvplan
