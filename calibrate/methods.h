// The calibration methods, as a set (CalibrateOptions::methods), and the names the command line gives them.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

enum class CalibrationMethod {
  kShare,     // KVSharer layer sharing
  kDict,      // CSR dictionaries
  kQuant,     // KIVI-style quantization
  kBudget,    // token budgets from attention coverage
  kRefresh,   // RefreshKV
  kOptimise,  // quantization and budgets chosen per layer by measured loss
};

class CalibrationMethods {
 public:
  constexpr CalibrationMethods() = default;
  constexpr CalibrationMethods(std::initializer_list<CalibrationMethod> methods) {
    for (CalibrationMethod method : methods) insert(method);
  }
  constexpr void insert(CalibrationMethod method) { bits_ |= Bit(method); }
  constexpr bool contains(CalibrationMethod method) const { return (bits_ & Bit(method)) != 0; }
  constexpr bool empty() const { return bits_ == 0; }
  constexpr void clear() { bits_ = 0; }
  constexpr bool operator==(const CalibrationMethods&) const = default;

 private:
  static constexpr uint32_t Bit(CalibrationMethod method) { return uint32_t(1) << int(method); }
  uint32_t bits_ = 0;
};

// "share", "dict", "quant", "budget", "refresh", "optimise", sorted as messages and the command line list them.
const std::vector<std::string>& CalibrationMethodNames();
// The name the command line gives `method`.
const char* CalibrationMethodName(CalibrationMethod method);

// The set `names` name (each one of CalibrationMethodNames()); InvalidArgument naming the first unknown one and
// listing the known ones.
absl::StatusOr<CalibrationMethods> ParseCalibrationMethods(const std::vector<std::string>& names);

}  // namespace kvplan
