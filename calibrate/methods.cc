#include "calibrate/methods.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvplan {
namespace {

// Sorted by name.
const std::pair<const char*, CalibrationMethod> kMethodNames[] = {
    {"budget", CalibrationMethod::kBudget},     {"dict", CalibrationMethod::kDict},
    {"optimise", CalibrationMethod::kOptimise}, {"quant", CalibrationMethod::kQuant},
    {"refresh", CalibrationMethod::kRefresh},   {"share", CalibrationMethod::kShare},
};

}  // namespace

const std::vector<std::string>& CalibrationMethodNames() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> names;
    for (const auto& [name, method] : kMethodNames) names.push_back(name);
    return names;
  }();
  return names;
}

const char* CalibrationMethodName(CalibrationMethod method) {
  for (const auto& [name, known] : kMethodNames)
    if (known == method) return name;
  return "unknown";
}

absl::StatusOr<CalibrationMethods> ParseCalibrationMethods(const std::vector<std::string>& names) {
  CalibrationMethods methods;
  for (const std::string& name : names) {
    const auto* known = std::find_if(std::begin(kMethodNames), std::end(kMethodNames),
                                     [&](const auto& entry) { return name == entry.first; });
    if (known == std::end(kMethodNames))
      return absl::InvalidArgumentError(
          absl::StrCat("unknown method \"", name, "\" (known: ", absl::StrJoin(CalibrationMethodNames(), ", "), ")"));
    methods.insert(known->second);
  }
  return methods;
}

}  // namespace kvplan
