// Text data files: reading them, splitting them into documents and turning documents into the token stream
// calibration and evaluation read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/tokenizer.h"

namespace kvplan {

// Documents of a fixture data file are separated by lines holding exactly "<|doc|>".
std::vector<std::string> SplitDocuments(const std::string& text);
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// The token stream evaluations read: each document as BOS + its tokens, concatenated, cut at max_tokens.
std::vector<int32_t> TokenizeDocuments(const Tokenizer& tokenizer, const std::vector<std::string>& documents,
                                       int bos_token_id, int64_t max_tokens);

}  // namespace kvplan
