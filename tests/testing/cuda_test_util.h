// For tests built only with CUDA: they skip, not fail, on a machine without a device.
#pragma once

#include "gtest/gtest.h"
#include "kernels/cuda/kernels.h"

#define KVPLAN_SKIP_WITHOUT_GPU() \
  if (!::kvplan::cuda::device_available()) GTEST_SKIP() << "no CUDA device"
