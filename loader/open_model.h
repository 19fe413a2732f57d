// Opening a model: what every entry point (the CLI's commands, serve, the C API, calibration and sweep) reads
// from a model directory, in one place, and how a prompt becomes token ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/generation_config.h"
#include "loader/model_config.h"
#include "loader/tokenizer.h"
#include "loader/weights.h"

namespace kvplan {

// A model's config, weights, tokenizer and generation settings, opened together.
struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Tokenizer> tokenizer;  // null for a random-weight shape, which has no vocabulary of text
  GenerationConfig generation;           // defaults for a random-weight shape

  // The model's BOS token when it has one, then `text`'s tokens: how every entry point encodes a prompt. Needs
  // the tokenizer.
  std::vector<int32_t> EncodePrompt(std::string_view text) const;
  // A data file (ReadTextFile: refused when it is not text) as the token stream calibration and evaluation read:
  // its <|doc|>-separated documents, each as BOS + its tokens, concatenated, cut at max_tokens (TokenizeDocuments).
  // Needs the tokenizer.
  absl::StatusOr<std::vector<int32_t>> EncodeDataFile(const std::string& path, int64_t max_tokens) const;
};

// config.json, the safetensors checkpoint (one file or a sharded index), tokenizer.json and the generation
// settings (generation_config.json, tokenizer_config.json) of a Hugging Face model directory.
absl::StatusOr<LoadedModel> OpenModel(const std::string& model_dir);
// A named real shape (NamedModelShape) with seeded random weights, for speed at scale.
absl::StatusOr<LoadedModel> RandomModel(const std::string& shape_name, uint64_t seed);

}  // namespace kvplan
