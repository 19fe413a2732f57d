#include "loader/model_config.h"

#include <cmath>
#include <limits>
#include <map>
#include <numbers>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/input_file.h"
#include "base/status_macros.h"
#include "loader/json_input.h"
#include "loader/model_files.h"
#include "nlohmann/json.hpp"

namespace kvplan {
namespace {

using nlohmann::json;

absl::Status ConfigError(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", message));
}

// The value as a T, or nullopt when it has another type or does not fit: nlohmann's get<T>() would cast 1e308
// or 2^64 into an int or a float, which is undefined.
template <typename T>
std::optional<T> ValueAs(const json& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value.is_boolean() ? std::optional<T>(value.get<bool>()) : std::nullopt;
  } else if constexpr (std::is_same_v<T, std::string>) {
    return value.is_string() ? std::optional<T>(value.get<std::string>()) : std::nullopt;
  } else if constexpr (std::is_integral_v<T>) {
    return JsonInteger<T>(value);
  } else {
    if (!value.is_number()) return std::nullopt;
    const double number = value.get<double>();
    if (!std::isfinite(number) || std::abs(number) > std::numeric_limits<T>::max()) return std::nullopt;
    return T(number);
  }
}

template <typename T>
absl::StatusOr<T> Required(const json& object, const char* key) {
  if (!object.contains(key) || object[key].is_null()) return ConfigError(absl::StrCat("missing \"", key, "\""));
  const std::optional<T> value = ValueAs<T>(object[key]);
  if (!value.has_value()) return ConfigError(absl::StrCat("\"", key, "\" has the wrong type or is out of range"));
  return *value;
}

template <typename T>
T Optional(const json& object, const char* key, T fallback) {
  if (!object.contains(key) || object[key].is_null()) return fallback;
  return ValueAs<T>(object[key]).value_or(fallback);
}

// Like Optional, but a value that is present and of the wrong type or range is an error, not the fallback.
template <typename T>
absl::StatusOr<T> CheckedOptional(const json& object, const char* key, T fallback) {
  if (!object.contains(key) || object[key].is_null()) return fallback;
  return Required<T>(object, key);
}

// eos_token_id may be a list (Llama 3 instruct); the first entry is the one generation stops on.
int FirstTokenId(const json& object, const char* key) {
  if (!object.contains(key) || object[key].is_null()) return -1;
  const json& value = object[key];
  if (value.is_array()) return value.empty() ? -1 : JsonInteger<int>(value[0]).value_or(-1);
  return JsonInteger<int>(value).value_or(-1);
}

// transformers' defaults where config.json leaves max_position_embeddings out: LlamaConfig 2048, MistralConfig
// 4096 * 32, Qwen2Config 32768.
int64_t DefaultMaxPositions(const std::string& architecture) {
  if (architecture == "MistralForCausalLM") return 4096 * 32;
  if (architecture == "Qwen2ForCausalLM") return 32768;
  return 2048;
}

// Values that parse but would make the model silently wrong: a non-positive epsilon (NaN or negative variance
// terms), a context no model has (0 or negative turns off every position check, beyond 2^24 no real model
// reaches), and special tokens outside the vocabulary (generation would never stop, or embed out of bounds).
absl::Status CheckValues(const ModelConfig& model) {
  if (!(model.rms_norm_eps > 0.0f))
    return ConfigError(absl::StrCat("\"rms_norm_eps\" must be positive (got ", model.rms_norm_eps, ")"));
  constexpr int64_t kMaxPositions = int64_t(1) << 24;
  if (model.max_position_embeddings < 1 || model.max_position_embeddings > kMaxPositions)
    return ConfigError(absl::StrCat("\"max_position_embeddings\" must be from 1 to ", kMaxPositions, " (got ",
                                    model.max_position_embeddings, ")"));
  for (const auto& [key, id] : {std::pair{"bos_token_id", model.bos_token_id}, {"eos_token_id", model.eos_token_id}})
    if (id < -1 || id >= model.vocab_size)  // -1: not given
      return ConfigError(
          absl::StrCat("\"", key, "\" ", id, " is outside the vocabulary (vocab_size ", model.vocab_size, ")"));
  return absl::OkStatus();
}

// Far above any real model (hidden sizes near 2^14, vocabularies near 2^18, about 128 layers), and low enough
// that every size product up to parameter_count() fits int64 and q_dim() fits int.
absl::Status CheckSizesAreBounded(const ModelConfig& model) {
  constexpr int64_t kMaxDimension = 1 << 20, kMaxVocabulary = 1 << 24, kMaxLayers = 1 << 16;
  const struct {
    const char* name;
    int64_t value, limit;
  } kBounds[] = {{"vocab_size", model.vocab_size, kMaxVocabulary},
                 {"hidden_size", model.hidden_size, kMaxDimension},
                 {"intermediate_size", model.intermediate_size, kMaxDimension},
                 {"num_hidden_layers", model.num_layers, kMaxLayers},
                 {"num_attention_heads * head_dim", int64_t(model.num_heads) * model.head_dim, kMaxDimension}};
  for (const auto& [name, value, limit] : kBounds)
    if (value > limit)
      return ConfigError(absl::StrCat(name, " = ", value, " is larger than kvplan supports (", limit, ")"));
  return absl::OkStatus();
}

absl::Status ParseRope(const json& config, ModelConfig& model) {
  // Newer transformers write everything under rope_parameters; older ones split rope_theta and rope_scaling.
  json parameters = json::object();
  if (config.contains("rope_parameters") && config["rope_parameters"].is_object()) {
    parameters = config["rope_parameters"];
  } else if (config.contains("rope_scaling") && config["rope_scaling"].is_object()) {
    parameters = config["rope_scaling"];
  }
  RopeConfig& rope = model.rope;
  rope.theta = Optional<double>(parameters, "rope_theta", Optional<double>(config, "rope_theta", 10000.0));
  rope.type = Optional<std::string>(parameters, "rope_type", Optional<std::string>(parameters, "type", "default"));
  rope.factor = Optional<double>(parameters, "factor", 1.0);
  rope.low_freq_factor = Optional<double>(parameters, "low_freq_factor", 1.0);
  rope.high_freq_factor = Optional<double>(parameters, "high_freq_factor", 4.0);
  rope.beta_fast = Optional<double>(parameters, "beta_fast", 32.0);
  rope.beta_slow = Optional<double>(parameters, "beta_slow", 1.0);
  rope.original_max_position_embeddings =
      Optional<int64_t>(parameters, "original_max_position_embeddings", model.max_position_embeddings);
  if (rope.type == "default" || rope.type == "linear" || rope.type == "llama3") {
    rope.attention_factor = 1.0;
  } else if (rope.type == "yarn") {
    const double default_factor = rope.factor <= 1.0 ? 1.0 : 0.1 * std::log(rope.factor) + 1.0;
    rope.attention_factor = Optional<double>(parameters, "attention_factor", default_factor);
  } else {
    return ConfigError(
        absl::StrCat("rope type \"", rope.type, "\" is not supported (supported: default, linear, llama3, yarn)"));
  }
  if (rope.theta <= 0 || rope.factor <= 0) return ConfigError("rope_theta and rope factor must be positive");
  return absl::OkStatus();
}

}  // namespace

int64_t ModelConfig::parameter_count() const {
  const int64_t attention = int64_t(hidden_size) * (q_dim() + 2 * kv_dim()) + int64_t(q_dim()) * hidden_size;
  const int64_t mlp = int64_t(3) * hidden_size * intermediate_size;
  const int64_t embeddings = int64_t(vocab_size) * hidden_size * (tie_word_embeddings ? 1 : 2);
  return num_layers * (attention + mlp + 2 * hidden_size) + embeddings + hidden_size;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  KVPLAN_ASSIGN_OR_RETURN(const json config, ParseJsonInput(json_text, "config.json"));
  if (!config.is_object()) return ConfigError("not a JSON object");
  ModelConfig model;
  const json architectures = config.value("architectures", json::array());
  if (!architectures.is_array() || architectures.empty() || !architectures[0].is_string())
    return ConfigError("missing \"architectures\"");
  model.architecture = architectures[0].get<std::string>();
  static const char* kSupported[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
  if (std::find(std::begin(kSupported), std::end(kSupported), model.architecture) == std::end(kSupported)) {
    return absl::UnimplementedError(absl::StrCat("unsupported architecture \"", model.architecture,
                                                 "\" (supported: ", absl::StrJoin(kSupported, ", "), ")"));
  }
  const std::string activation = Optional<std::string>(config, "hidden_act", "silu");
  if (activation != "silu") return ConfigError(absl::StrCat("hidden_act \"", activation, "\" is not supported"));

#define KVPLAN_ASSIGN_REQUIRED(field, key, type)              \
  {                                                           \
    absl::StatusOr<type> value = Required<type>(config, key); \
    if (!value.ok()) return value.status();                   \
    model.field = *value;                                     \
  }
  KVPLAN_ASSIGN_REQUIRED(vocab_size, "vocab_size", int)
  KVPLAN_ASSIGN_REQUIRED(hidden_size, "hidden_size", int)
  KVPLAN_ASSIGN_REQUIRED(intermediate_size, "intermediate_size", int)
  KVPLAN_ASSIGN_REQUIRED(num_layers, "num_hidden_layers", int)
  KVPLAN_ASSIGN_REQUIRED(num_heads, "num_attention_heads", int)
#undef KVPLAN_ASSIGN_REQUIRED
  model.num_kv_heads = Optional<int>(config, "num_key_value_heads", model.num_heads);
  if (model.num_heads <= 0 || model.hidden_size <= 0 || model.num_layers <= 0 || model.vocab_size <= 0 ||
      model.intermediate_size <= 0)
    return ConfigError("sizes must be positive");
  model.head_dim = Optional<int>(config, "head_dim", model.hidden_size / model.num_heads);
  if (model.num_kv_heads <= 0 || model.num_heads % model.num_kv_heads != 0)
    return ConfigError(absl::StrCat("num_attention_heads (", model.num_heads,
                                    ") must be a multiple of num_key_value_heads (", model.num_kv_heads, ")"));
  if (model.head_dim <= 0 || model.head_dim % 2 != 0) return ConfigError("head_dim must be even and positive");
  KVPLAN_RETURN_IF_ERROR(CheckSizesAreBounded(model));
  KVPLAN_ASSIGN_OR_RETURN(model.rms_norm_eps, CheckedOptional<float>(config, "rms_norm_eps", 1e-6f));
  KVPLAN_ASSIGN_OR_RETURN(model.max_position_embeddings, CheckedOptional<int64_t>(config, "max_position_embeddings",
                                                                                  DefaultMaxPositions(model.architecture)));
  model.tie_word_embeddings = Optional<bool>(config, "tie_word_embeddings", false);
  // Qwen2 always has q/k/v biases and writes no attention_bias key.
  model.attention_bias = Optional<bool>(config, "attention_bias", model.architecture == "Qwen2ForCausalLM");
  if (Optional<bool>(config, "mlp_bias", false)) return ConfigError("mlp_bias=true is not supported");
  const bool sliding = Optional<bool>(config, "use_sliding_window", model.architecture == "MistralForCausalLM");
  model.sliding_window = sliding ? Optional<int>(config, "sliding_window", 0) : 0;
  model.bos_token_id = FirstTokenId(config, "bos_token_id");
  model.eos_token_id = FirstTokenId(config, "eos_token_id");
  KVPLAN_RETURN_IF_ERROR(CheckValues(model));
  KVPLAN_RETURN_IF_ERROR(ParseRope(config, model));
  return model;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = ModelFile(model_dir, "config.json");
  KVPLAN_ASSIGN_OR_RETURN(const std::string text, ReadInputFile(path, "model config"));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text);
  if (!config.ok()) return absl::Status(config.status().code(), absl::StrCat(path, ": ", config.status().message()));
  return config;
}

namespace {

struct NamedShape {
  const char* architecture;
  int vocab, hidden, ffn, layers, heads, kv_heads, head_dim;
  double theta;
  int64_t context;
};

const std::map<std::string, NamedShape>& Shapes() {
  static const auto* shapes = new std::map<std::string, NamedShape>{
      {"llama-3-8b", {"LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 500000.0, 8192}},
      {"llama-3-70b", {"LlamaForCausalLM", 128256, 8192, 28672, 80, 64, 8, 128, 500000.0, 8192}},
      {"llama-2-7b", {"LlamaForCausalLM", 32000, 4096, 11008, 32, 32, 32, 128, 10000.0, 4096}},
      {"mistral-7b", {"MistralForCausalLM", 32768, 4096, 14336, 32, 32, 8, 128, 1000000.0, 32768}},
      {"qwen2-7b", {"Qwen2ForCausalLM", 152064, 3584, 18944, 28, 28, 4, 128, 1000000.0, 32768}},
  };
  return *shapes;
}

}  // namespace

std::vector<std::string> NamedModelShapes() {
  std::vector<std::string> names;
  for (const auto& [name, shape] : Shapes()) names.push_back(name);
  return names;
}

absl::StatusOr<ModelConfig> NamedModelShape(const std::string& name) {
  const auto it = Shapes().find(name);
  if (it == Shapes().end())
    return absl::NotFoundError(
        absl::StrCat("unknown model shape \"", name, "\" (known: ", absl::StrJoin(NamedModelShapes(), ", "), ")"));
  const NamedShape& shape = it->second;
  ModelConfig model;
  model.architecture = shape.architecture;
  model.vocab_size = shape.vocab;
  model.hidden_size = shape.hidden;
  model.intermediate_size = shape.ffn;
  model.num_layers = shape.layers;
  model.num_heads = shape.heads;
  model.num_kv_heads = shape.kv_heads;
  model.head_dim = shape.head_dim;
  model.rope.theta = shape.theta;
  model.max_position_embeddings = shape.context;
  model.rope.original_max_position_embeddings = shape.context;
  model.attention_bias = std::string(shape.architecture) == "Qwen2ForCausalLM";
  return model;
}

std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const RopeConfig& rope = config.rope;
  const int dim = config.head_dim;
  std::vector<float> result(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    const double base = 1.0 / std::pow(rope.theta, 2.0 * i / dim);
    double value = base;
    if (rope.type == "linear") {
      value = base / rope.factor;
    } else if (rope.type == "llama3") {
      const double old_context = double(rope.original_max_position_embeddings);
      const double wavelength = 2 * std::numbers::pi / base;
      const double low_freq_wavelength = old_context / rope.low_freq_factor;
      const double high_freq_wavelength = old_context / rope.high_freq_factor;
      if (wavelength > low_freq_wavelength) {
        value = base / rope.factor;
      } else if (wavelength >= high_freq_wavelength) {
        const double smooth =
            (old_context / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
        value = (1 - smooth) * base / rope.factor + smooth * base;
      }
    } else if (rope.type == "yarn") {
      const double old_context = double(rope.original_max_position_embeddings);
      auto correction_dim = [&](double rotations) {
        return dim * std::log(old_context / (rotations * 2 * std::numbers::pi)) / (2 * std::log(rope.theta));
      };
      const double low = std::max(0.0, std::floor(correction_dim(rope.beta_fast)));
      double high = std::min(double(dim - 1), std::ceil(correction_dim(rope.beta_slow)));
      if (high == low) high += 0.001;
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;
      value = base / rope.factor * (1 - extrapolation) + base * extrapolation;
    }
    result[i] = float(value);
  }
  return result;
}

}  // namespace kvplan
