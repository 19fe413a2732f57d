#include "kernels/cuda/kernels.h"

namespace kvplan::cuda {

bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace kvplan::cuda
