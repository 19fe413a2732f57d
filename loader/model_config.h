// The shape and positional encoding of a Llama-family decoder, read from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvplan {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3 | yarn
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  double beta_fast = 32.0;        // yarn
  double beta_slow = 1.0;         // yarn
  int64_t original_max_position_embeddings = 0;
  double attention_factor = 1.0;  // yarn scales cos/sin by this
};

struct ModelConfig {
  std::string architecture;  // LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-5f;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int sliding_window = 0;  // 0: attend to the whole context
  int bos_token_id = -1;
  int eos_token_id = -1;
  RopeConfig rope;

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int64_t parameter_count() const;
};

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Shapes of real models for benchmarking with random weights: "llama-3-8b", "llama-2-7b", "mistral-7b",
// "qwen2-7b", "llama-3-70b".
absl::StatusOr<ModelConfig> NamedModelShape(const std::string& name);
std::vector<std::string> NamedModelShapes();

// RoPE inverse frequencies ([head_dim / 2]) with the configured scaling applied, as HF computes them.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace kvplan
