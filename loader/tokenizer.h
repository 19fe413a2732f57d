// Tokenizer for Hugging Face tokenizer.json files of Llama-family models: byte-level BPE (GPT-2 / Llama 3, with
// the pre-tokenizer regex run through PCRE2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text);
  ~Tokenizer();

  // Ids of `text` without a BOS token; added/special tokens written in the text are recognised.
  std::vector<int32_t> Encode(std::string_view text) const;
  std::string Decode(const std::vector<int32_t>& ids) const;
  int vocab_size() const;
  // -1 when absent.
  int32_t TokenId(const std::string& token) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvplan
