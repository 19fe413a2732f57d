// How kvplan reads the JSON users bring (config.json, tokenizer.json, the sharded index, safetensors headers, the
// server's request bodies) without trusting it: nesting is bounded before anything recurses over the document,
// and integers are range-checked before they become sizes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvplan {

// serde_json, which writes Hugging Face's files, refuses nesting deeper than this too. nlohmann copies values
// recursively (json.value(...) copies), so a document nested 100k deep would overflow the stack.
inline constexpr int kMaxJsonDepth = 128;

// The parsed document, or an error naming `what` when it is not JSON or nests deeper than kMaxJsonDepth.
inline absl::StatusOr<nlohmann::json> ParseJsonInput(std::string_view text, const std::string& what) {
  bool too_deep = false;
  // Discarding what lies below the limit keeps the parser from building the deep tree at all.
  const auto limit_depth = [&too_deep](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth <= kMaxJsonDepth) return true;
    too_deep = true;
    return false;
  };
  nlohmann::json document = nlohmann::json::parse(text.begin(), text.end(), limit_depth, /*allow_exceptions=*/false);
  if (too_deep) return absl::DataLossError(absl::StrCat(what, ": nested deeper than ", kMaxJsonDepth));
  if (document.is_discarded()) return absl::DataLossError(absl::StrCat(what, ": not valid JSON"));
  return document;
}

// The integer `value` holds, when it is an integer that fits T. nlohmann's get<T>() casts floats and
// out-of-range integers instead, which is undefined behaviour for 1e308 and wraps 2^32 to 0.
template <typename T>
std::optional<T> JsonInteger(const nlohmann::json& value) {
  if (value.is_number_unsigned()) {
    const uint64_t number = value.get<uint64_t>();
    if (std::in_range<T>(number)) return T(number);
  } else if (value.is_number_integer()) {
    const int64_t number = value.get<int64_t>();
    if (std::in_range<T>(number)) return T(number);
  }
  return std::nullopt;
}

}  // namespace kvplan
