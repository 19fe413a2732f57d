#include "loader/generation_config.h"

#include <algorithm>
#include <filesystem>
#include <optional>

#include "base/input_file.h"
#include "base/status_macros.h"
#include "loader/json_input.h"
#include "loader/model_files.h"

namespace kvplan {
namespace {

using nlohmann::json;

// The parsed file, or nullopt when it does not exist.
absl::StatusOr<std::optional<json>> ReadOptionalJson(const std::string& path) {
  if (!std::filesystem::exists(path)) return std::optional<json>();
  KVPLAN_ASSIGN_OR_RETURN(const std::string text, ReadInputFile(path, "generation config"));
  KVPLAN_ASSIGN_OR_RETURN(json document, ParseJsonInput(text, path));
  if (!document.is_object()) return absl::DataLossError(absl::StrCat(path, ": not a JSON object"));
  return std::optional<json>(std::move(document));
}

absl::Status AddStopIds(const json& document, const std::string& path, std::vector<int32_t>& ids) {
  if (!document.contains("eos_token_id") || document["eos_token_id"].is_null()) return absl::OkStatus();
  const json& value = document["eos_token_id"];
  for (const json& id : value.is_array() ? value : json::array({value})) {
    const std::optional<int32_t> token = JsonInteger<int32_t>(id);
    if (!token || *token < 0)
      return absl::DataLossError(absl::StrCat(path, ": eos_token_id must be a token id or a list of them"));
    if (std::find(ids.begin(), ids.end(), *token) == ids.end()) ids.push_back(*token);
  }
  return absl::OkStatus();
}

// A special token is written as its text or as an added-token object {"content": text, ...}.
absl::StatusOr<std::string> TokenText(const json& document, const char* key, const std::string& path) {
  if (!document.contains(key) || document[key].is_null()) return std::string();
  const json& value = document[key];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  return absl::DataLossError(absl::StrCat(path, ": ", key, " must be a string or an object with a string content"));
}

// A template string, or a list of named templates ([{"name": ..., "template": ...}]) of which "default" is used.
absl::StatusOr<std::string> ChatTemplateText(const json& document, const std::string& path) {
  if (!document.contains("chat_template") || document["chat_template"].is_null()) return std::string();
  const json& value = document["chat_template"];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array()) {
    for (const json& entry : value)
      if (entry.is_object() && entry.value("name", json()) == "default" && entry.contains("template") &&
          entry["template"].is_string())
        return entry["template"].get<std::string>();
    return absl::DataLossError(absl::StrCat(path, ": chat_template lists no template named \"default\""));
  }
  return absl::DataLossError(absl::StrCat(path, ": chat_template must be a string or a list of named templates"));
}

}  // namespace

absl::StatusOr<GenerationConfig> LoadGenerationConfig(const std::string& model_dir) {
  GenerationConfig generation;
  for (const char* name : {"config.json", "generation_config.json"}) {
    const std::string path = ModelFile(model_dir, name);
    KVPLAN_ASSIGN_OR_RETURN(std::optional<json> document, ReadOptionalJson(path));
    if (document) KVPLAN_RETURN_IF_ERROR(AddStopIds(*document, path, generation.stop_token_ids));
  }
  const std::string path = ModelFile(model_dir, "tokenizer_config.json");
  KVPLAN_ASSIGN_OR_RETURN(std::optional<json> tokenizer_config, ReadOptionalJson(path));
  if (!tokenizer_config) return generation;
  KVPLAN_ASSIGN_OR_RETURN(generation.chat_template, ChatTemplateText(*tokenizer_config, path));
  KVPLAN_ASSIGN_OR_RETURN(generation.bos_token, TokenText(*tokenizer_config, "bos_token", path));
  KVPLAN_ASSIGN_OR_RETURN(generation.eos_token, TokenText(*tokenizer_config, "eos_token", path));
  return generation;
}

}  // namespace kvplan
