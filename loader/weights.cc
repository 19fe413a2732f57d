#include "loader/weights.h"

#include <cmath>

#include "absl/hash/hash.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/hash.h"
#include "base/status_macros.h"

namespace kvplan {

TensorSpec EmbeddingSpec(const ModelConfig& config) {
  return {"model.embed_tokens.weight", {config.vocab_size, config.hidden_size}, TensorSpec::Kind::kMatrix};
}

TensorSpec FinalNormSpec(const ModelConfig& config) {
  return {"model.norm.weight", {config.hidden_size}, TensorSpec::Kind::kNorm};
}

TensorSpec LmHeadSpec(const ModelConfig& config) {
  if (config.tie_word_embeddings) return EmbeddingSpec(config);
  return {"lm_head.weight", {config.vocab_size, config.hidden_size}, TensorSpec::Kind::kMatrix};
}

LayerSpecs LayerTensorSpecs(const ModelConfig& config, int layer) {
  const std::string prefix = absl::StrCat("model.layers.", layer, ".");
  const int64_t hidden = config.hidden_size, q_dim = config.q_dim(), kv_dim = config.kv_dim();
  const int64_t ffn = config.intermediate_size;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    return TensorSpec{prefix + name, {rows, cols}, TensorSpec::Kind::kMatrix};
  };
  auto vector = [&](const std::string& name, int64_t size, TensorSpec::Kind kind) {
    return TensorSpec{prefix + name, {size}, kind};
  };
  using Kind = TensorSpec::Kind;
  return LayerSpecs{
      .attention_norm = vector("input_layernorm.weight", hidden, Kind::kNorm),
      .q = matrix("self_attn.q_proj.weight", q_dim, hidden),
      .k = matrix("self_attn.k_proj.weight", kv_dim, hidden),
      .v = matrix("self_attn.v_proj.weight", kv_dim, hidden),
      .o = matrix("self_attn.o_proj.weight", hidden, q_dim),
      .mlp_norm = vector("post_attention_layernorm.weight", hidden, Kind::kNorm),
      .gate = matrix("mlp.gate_proj.weight", ffn, hidden),
      .up = matrix("mlp.up_proj.weight", ffn, hidden),
      .down = matrix("mlp.down_proj.weight", hidden, ffn),
      .q_bias = vector("self_attn.q_proj.bias", q_dim, Kind::kBias),
      .k_bias = vector("self_attn.k_proj.bias", kv_dim, Kind::kBias),
      .v_bias = vector("self_attn.v_proj.bias", kv_dim, Kind::kBias),
  };
}

absl::Status CheckCheckpointLayers(const Checkpoint& checkpoint, const ModelConfig& config) {
  const std::string layers = "model.layers.";
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    if (name.rfind(layers, 0) != 0) continue;
    const std::string rest = name.substr(layers.size());
    int64_t layer = 0;
    if (!absl::SimpleAtoi(rest.substr(0, rest.find('.')), &layer) || layer < config.num_layers) continue;
    return absl::InvalidArgumentError(absl::StrCat("the checkpoint holds ", name,
                                                   ", but config.json's num_hidden_layers is ", config.num_layers));
  }
  return absl::OkStatus();
}

CheckpointWeightSource::CheckpointWeightSource(std::unique_ptr<Checkpoint> checkpoint, std::string model_dir)
    : checkpoint_(std::move(checkpoint)), model_dir_(std::move(model_dir)) {}

absl::StatusOr<std::vector<float>> CheckpointWeightSource::Read(const TensorSpec& spec) const {
  return checkpoint_->ReadFloat(spec.name, spec.shape);
}

uint64_t CheckpointWeightSource::content_hash() const {
  uint64_t hash = kFnv1a64Seed;
  for (const auto& [name, tensor] : checkpoint_->tensors()) {
    hash = Fnv1a64(name.data(), name.size(), hash);
    hash = Fnv1a64(tensor.shape.data(), tensor.shape.size() * sizeof(tensor.shape[0]), hash);
    hash = Fnv1a64(tensor.data, size_t(tensor.bytes), hash);
  }
  return hash;
}

uint64_t RandomWeightSource::content_hash() const { return seed_ * 0x9e3779b97f4a7c15ull + 1; }

std::string RandomWeightSource::description() const { return absl::StrCat("random(seed=", seed_, ")"); }

absl::StatusOr<std::vector<float>> RandomWeightSource::Read(const TensorSpec& spec) const {
  int64_t count = 1;
  for (int64_t dim : spec.shape) count *= dim;
  std::vector<float> values(count);
  if (spec.kind != TensorSpec::Kind::kMatrix) {
    std::fill(values.begin(), values.end(), spec.kind == TensorSpec::Kind::kNorm ? 1.0f : 0.0f);
    return values;
  }
  const float bound = 1.0f / std::sqrt(float(spec.shape.back()));
  const uint64_t tensor_seed = absl::HashOf(spec.name) ^ seed_;
  // A counter-based hash (splitmix64) so elements are independent and the fill parallelises.
#pragma omp parallel for
  for (int64_t i = 0; i < count; ++i) {
    uint64_t z = tensor_seed + uint64_t(i) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    values[i] = bound * (2.0f * float(z >> 40) / float(1 << 24) - 1.0f);
  }
  return values;
}

}  // namespace kvplan
