// Text data files: reading them, splitting them into documents and turning documents into the token stream
// calibration and evaluation read.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/tokenizer.h"

namespace kvplan {

// Documents of a fixture data file are separated by lines holding exactly "<|doc|>".
std::vector<std::string> SplitDocuments(const std::string& text);

// Reads a data file, refusing one that is not text: InvalidArgument naming the file and the fraction of its
// bytes that are invalid UTF-8 or control characters when that is above kMaxNonTextFraction.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);
// Text in a legacy 8-bit encoding (Latin-1, Windows-1252) stays far below a tenth: accented letters are a few
// percent of the characters even in French or Portuguese, and the tokenizers' byte fallback copes with them.
// Random or compressed bytes (about 60%), binaries such as safetensors and UTF-16 text (about 50%) are far above.
inline constexpr double kMaxNonTextFraction = 0.1;
// The fraction of `text`'s bytes that are not part of a valid UTF-8 sequence, or are control characters other
// than tab, newline, carriage return and form feed.
double NonTextFraction(std::string_view text);

// The token stream evaluations read: each document as BOS + its tokens, concatenated, cut at max_tokens.
std::vector<int32_t> TokenizeDocuments(const Tokenizer& tokenizer, const std::vector<std::string>& documents,
                                       int bos_token_id, int64_t max_tokens);

}  // namespace kvplan
