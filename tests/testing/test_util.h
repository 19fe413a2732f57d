#pragma once

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvplan::testing {

// KVPLAN_SHARED_DIR in the environment overrides the configured fixture folder (the GPU machine keeps the
// fixtures elsewhere).
inline std::string SharedDir() {
  const char* overridden = std::getenv("KVPLAN_SHARED_DIR");
  return overridden != nullptr ? overridden : KVPLAN_SHARED_DIR;
}
inline std::string TestDataDir() { return KVPLAN_TEST_DATA_DIR; }
inline std::string FixtureModelDir() { return SharedDir() + "/models/llama-dev-6m"; }
// A fresh, empty folder named `name` under the test's temporary directory.
inline std::string FreshTestFolder(const std::string& name) {
  const std::filesystem::path folder = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder.string();
}

// ||a - b|| / ||b||
inline double RelativeError(const float* a, const float* b, size_t n) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < n; ++i) {
    diff += double(a[i] - b[i]) * (a[i] - b[i]);
    norm += double(b[i]) * b[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

}  // namespace kvplan::testing

#define KVPLAN_ASSERT_OK_AND_ASSIGN(lhs, expr)                \
  auto lhs##_or = (expr);                                     \
  ASSERT_TRUE(lhs##_or.ok()) << lhs##_or.status().ToString(); \
  auto lhs = std::move(*lhs##_or)
