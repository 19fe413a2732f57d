// What a model directory says about generating text, beyond the weights and the tokenizer: the ids that end
// generation (config.json and generation_config.json) and the chat template with its special tokens
// (tokenizer_config.json).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

struct GenerationConfig {
  // Every eos_token_id of config.json and generation_config.json (each an id or a list), without repeats.
  std::vector<int32_t> stop_token_ids;
  std::string chat_template;  // empty when tokenizer_config.json has none
  std::string bos_token, eos_token;
};

// generation_config.json and tokenizer_config.json may be absent; a file that is present must parse, and the
// fields read must have their documented types (an error names the file and the field).
absl::StatusOr<GenerationConfig> LoadGenerationConfig(const std::string& model_dir);

}  // namespace kvplan
