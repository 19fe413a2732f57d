// Where a model's tensors come from: a checkpoint on disk or a seeded random initialisation of a named real
// shape (for benchmarking at scale without downloading weights). Both hand out one tensor at a time so a
// runtime can convert and upload without holding the whole model twice.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/model_config.h"
#include "loader/safetensors.h"

namespace kvplan {

struct TensorSpec {
  enum class Kind { kMatrix, kNorm, kBias };
  std::string name;
  std::vector<int64_t> shape;
  Kind kind;
};

// Tensor names and shapes as transformers saves a Llama/Mistral/Qwen2 model.
TensorSpec EmbeddingSpec(const ModelConfig& config);
TensorSpec FinalNormSpec(const ModelConfig& config);
TensorSpec LmHeadSpec(const ModelConfig& config);  // the embedding when word embeddings are tied
struct LayerSpecs {
  TensorSpec attention_norm, q, k, v, o, mlp_norm, gate, up, down;
  TensorSpec q_bias, k_bias, v_bias;  // only read when config.attention_bias
};
LayerSpecs LayerTensorSpecs(const ModelConfig& config, int layer);
// A checkpoint with tensors of layers past config.json's num_hidden_layers is an error naming the first such tensor:
// the model would run with those layers silently dropped.
absl::Status CheckCheckpointLayers(const Checkpoint& checkpoint, const ModelConfig& config);

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual absl::StatusOr<std::vector<float>> Read(const TensorSpec& spec) const = 0;
  virtual std::string description() const = 0;
  // Identifies the weights (checkpoint contents, or the random seed) for plan fingerprints.
  virtual uint64_t content_hash() const = 0;
};

class CheckpointWeightSource : public WeightSource {
 public:
  explicit CheckpointWeightSource(std::unique_ptr<Checkpoint> checkpoint, std::string model_dir);
  absl::StatusOr<std::vector<float>> Read(const TensorSpec& spec) const override;
  std::string description() const override { return model_dir_; }
  uint64_t content_hash() const override;

 private:
  std::unique_ptr<Checkpoint> checkpoint_;
  std::string model_dir_;
};

// Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) matrices, unit norms, zero biases; deterministic in the seed.
class RandomWeightSource : public WeightSource {
 public:
  explicit RandomWeightSource(uint64_t seed) : seed_(seed) {}
  absl::StatusOr<std::vector<float>> Read(const TensorSpec& spec) const override;
  std::string description() const override;
  uint64_t content_hash() const override;

 private:
  uint64_t seed_;
};

}  // namespace kvplan
