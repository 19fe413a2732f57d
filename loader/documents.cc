#include "loader/documents.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

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

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
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
