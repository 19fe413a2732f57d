#include "loader/documents.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/input_file.h"
#include "base/status_macros.h"

namespace kvplan {

std::vector<std::string> SplitDocuments(const std::string& text) {
  std::vector<std::string> documents;
  std::string current;
  // A final newline ends the last line; it does not start an empty one.
  const absl::string_view body = absl::StripSuffix(text, "\n");
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (line == "<|doc|>") {
      if (!current.empty()) documents.push_back(std::move(current));
      current.clear();
      continue;
    }
    current.append(line.data(), line.size());
    current += '\n';
  }
  if (!current.empty()) documents.push_back(std::move(current));
  return documents;
}

double NonTextFraction(std::string_view text) {
  int64_t bad = 0;
  for (size_t i = 0; i < text.size();) {
    const auto byte = uint8_t(text[i]);
    if (byte < 0x80) {
      const bool control =
          (byte < 0x20 && byte != '\t' && byte != '\n' && byte != '\r' && byte != '\f') || byte == 0x7f;
      bad += control;
      ++i;
      continue;
    }
    // A lead byte, its continuation count and the smallest code point it may carry (shorter forms are overlong).
    const int continuations = byte >= 0xf0 ? 3 : byte >= 0xe0 ? 2 : byte >= 0xc0 ? 1 : 0;
    uint32_t code_point = byte & (0x3f >> continuations);
    bool valid = continuations > 0 && byte < 0xf5 && i + continuations < text.size();
    for (int k = 1; valid && k <= continuations; ++k) {
      const auto next = uint8_t(text[i + k]);
      valid = (next & 0xc0) == 0x80;
      code_point = (code_point << 6) | (next & 0x3f);
    }
    constexpr uint32_t kSmallest[] = {0, 0x80, 0x800, 0x10000};
    valid = valid && code_point >= kSmallest[continuations] && code_point <= 0x10ffff &&
            !(code_point >= 0xd800 && code_point <= 0xdfff);
    bad += !valid;
    i += valid ? continuations + 1 : 1;
  }
  return text.empty() ? 0.0 : double(bad) / double(text.size());
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  KVPLAN_ASSIGN_OR_RETURN(std::string text, ReadInputFile(path, "data file"));
  const double non_text = NonTextFraction(text);
  if (non_text > kMaxNonTextFraction)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is not text: %.1f%% of its bytes are invalid UTF-8 or control characters (at most %.0f%% are accepted)",
        path, 100 * non_text, 100 * kMaxNonTextFraction));
  return text;
}

std::vector<int32_t> TokenizeDocuments(const Tokenizer& tokenizer, const std::vector<std::string>& documents,
                                       int bos_token_id, int64_t max_tokens) {
  std::vector<int32_t> tokens;
  for (const std::string& document : documents) {
    if (int64_t(tokens.size()) >= max_tokens) break;
    if (bos_token_id >= 0) tokens.push_back(bos_token_id);
    const std::vector<int32_t> ids = tokenizer.Encode(document);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
  }
  if (int64_t(tokens.size()) > max_tokens) tokens.resize(max_tokens);
  return tokens;
}

}  // namespace kvplan
