// Asynchronous copies from global into shared memory (cp.async), shared by the kernels that stage tiles: the
// compressed attention chain and the tensor-core prefill. Copies issued since the last commit form one group.
#pragma once

#include <cuda_runtime.h>

namespace kvplan::cuda {
namespace {

__device__ __forceinline__ unsigned shared_address(const void* pointer) {
  return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

__device__ inline void copy_async_16(void* shared_target, const void* global_source) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared_target)), "l"(global_source));
}
// 16 bytes, or zeros when `present` is false.
__device__ inline void copy_async_16_or_zero(void* shared_target, const void* global_source, bool present) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_target)),
               "l"(global_source), "r"(present ? 16 : 0));
}
__device__ inline void copy_async_4(void* shared_target, const void* global_source) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(shared_target)), "l"(global_source));
}
__device__ inline void commit_async_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Every copy this thread issued has landed.
__device__ inline void wait_async_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Every group but the newest has landed: the newest stays in flight.
__device__ inline void wait_for_older_copies() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

}  // namespace
}  // namespace kvplan::cuda
