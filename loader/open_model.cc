#include "loader/open_model.h"

#include "base/status_macros.h"
#include "loader/documents.h"
#include "loader/model_files.h"
#include "loader/safetensors.h"

namespace kvplan {

std::vector<int32_t> LoadedModel::EncodePrompt(std::string_view text) const {
  std::vector<int32_t> ids;
  if (config.bos_token_id >= 0) ids.push_back(config.bos_token_id);
  const std::vector<int32_t> body = tokenizer->Encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

absl::StatusOr<std::vector<int32_t>> LoadedModel::EncodeDataFile(const std::string& path, int64_t max_tokens) const {
  KVPLAN_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(path));
  return TokenizeDocuments(*tokenizer, SplitDocuments(text), config.bos_token_id, max_tokens);
}

absl::StatusOr<LoadedModel> OpenModel(const std::string& model_dir) {
  LoadedModel model;
  KVPLAN_ASSIGN_OR_RETURN(model.config, LoadModelConfig(model_dir));
  KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(model_dir));
  KVPLAN_RETURN_IF_ERROR(CheckCheckpointLayers(*checkpoint, model.config));
  model.weights = std::make_unique<CheckpointWeightSource>(std::move(checkpoint), model_dir);
  KVPLAN_ASSIGN_OR_RETURN(model.tokenizer, Tokenizer::Load(ModelFile(model_dir, "tokenizer.json")));
  KVPLAN_ASSIGN_OR_RETURN(model.generation, LoadGenerationConfig(model_dir));
  return model;
}

absl::StatusOr<LoadedModel> RandomModel(const std::string& shape_name, uint64_t seed) {
  LoadedModel model;
  KVPLAN_ASSIGN_OR_RETURN(model.config, NamedModelShape(shape_name));
  model.weights = std::make_unique<RandomWeightSource>(seed);
  return model;
}

}  // namespace kvplan
