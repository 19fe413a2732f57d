// config.json parsing (both RoPE layouts, scaling types, architectures) and safetensors loading (single,
// sharded, and every kind of damage), on small files the tests write themselves.
#include <cstring>
#include <filesystem>
#include <fstream>

#include "loader/model_config.h"
#include "loader/open_model.h"
#include "loader/safetensors.h"
#include "loader/weights.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;

std::string BaseConfig(const std::string& extra) {
  return R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "max_position_embeddings": 64)" +
         extra + "}";
}

TEST(ModelConfigTest, ReadsFixtureWithRopeParameters) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(config, LoadModelConfig(testing::FixtureModelDir()));
  EXPECT_EQ(config.num_layers, 6);
  EXPECT_EQ(config.num_heads, 4);
  EXPECT_EQ(config.num_kv_heads, 2);
  EXPECT_EQ(config.head_dim, 64);
  EXPECT_EQ(config.rope.theta, 10000.0);
  EXPECT_EQ(config.rope.type, "default");
  EXPECT_FLOAT_EQ(config.rms_norm_eps, 1e-5f);
}

TEST(ModelConfigTest, OlderRopeThetaAndLlama3ScalingMatchTransformers) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(
      config, ParseModelConfig(BaseConfig(R"(, "head_dim": 128, "rope_theta": 500000.0, "rope_scaling": {"rope_type":
              "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192})")));
  EXPECT_EQ(config.rope.theta, 500000.0);
  const std::vector<float> inv_freq = RopeInverseFrequencies(config);
  ASSERT_EQ(inv_freq.size(), 64u);
  // Values of transformers' _compute_llama3_parameters for Llama 3.1 8B, evaluated in float64.
  EXPECT_FLOAT_EQ(inv_freq[0], 1.0f);
  EXPECT_FLOAT_EQ(inv_freq[20], 1.656044e-02f);  // high frequency: unchanged
  EXPECT_FLOAT_EQ(inv_freq[30], 1.371894e-03f);  // between the bands: interpolated
  EXPECT_FLOAT_EQ(inv_freq[45], 1.229764e-05f);  // low frequency: divided by the factor
  EXPECT_FLOAT_EQ(inv_freq[63], 3.068926e-07f);
}

TEST(ModelConfigTest, QwenBiasMistralWindowAndTiedEmbeddings) {
  std::string qwen = BaseConfig(R"(, "tie_word_embeddings": true)");
  qwen.replace(qwen.find("LlamaForCausalLM"), 16, "Qwen2ForCausalLM");
  KVPLAN_ASSERT_OK_AND_ASSIGN(qwen_config, ParseModelConfig(qwen));
  EXPECT_TRUE(qwen_config.attention_bias);
  EXPECT_TRUE(qwen_config.tie_word_embeddings);
  EXPECT_EQ(LmHeadSpec(qwen_config).name, "model.embed_tokens.weight");
  std::string mistral = BaseConfig(R"(, "sliding_window": 32)");
  mistral.replace(mistral.find("LlamaForCausalLM"), 16, "MistralForCausalLM");
  KVPLAN_ASSERT_OK_AND_ASSIGN(mistral_config, ParseModelConfig(mistral));
  EXPECT_EQ(mistral_config.sliding_window, 32);
}

TEST(ModelConfigTest, ClearErrors) {
  std::string gpt2 = BaseConfig("");
  gpt2.replace(gpt2.find("LlamaForCausalLM"), 16, "GPT2LMHeadModel");
  const auto unsupported = ParseModelConfig(gpt2);
  ASSERT_FALSE(unsupported.ok());
  EXPECT_NE(unsupported.status().message().find("GPT2LMHeadModel"), std::string::npos);
  const auto dynamic = ParseModelConfig(BaseConfig(R"(, "rope_scaling": {"type": "dynamic", "factor": 2.0})"));
  ASSERT_FALSE(dynamic.ok());
  EXPECT_NE(dynamic.status().message().find("dynamic"), std::string::npos);
  const auto missing = ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 4})");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("hidden_size"), std::string::npos);
  EXPECT_EQ(LoadModelConfig("/nonexistent").status().code(), absl::StatusCode::kNotFound);
}

// Values that parse but make no model: refused naming the key and the value, where they once ran silently.
TEST(ModelConfigTest, AbsurdValuesAreRefusedNamingTheKey) {
  const struct {
    const char* extra;
    const char* named;
  } kCases[] = {
      {R"(, "rms_norm_eps": -1)", "\"rms_norm_eps\" must be positive (got -1)"},
      {R"(, "rms_norm_eps": 0)", "\"rms_norm_eps\" must be positive"},
      {R"(, "eos_token_id": -5)", "\"eos_token_id\" -5 is outside the vocabulary (vocab_size 16)"},
      {R"(, "eos_token_id": [16, 2])", "\"eos_token_id\" 16 is outside"},
      {R"(, "bos_token_id": 99)", "\"bos_token_id\" 99 is outside"},
  };
  for (const auto& [extra, named] : kCases) {
    const auto config = ParseModelConfig(BaseConfig(extra));
    ASSERT_FALSE(config.ok()) << extra;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << extra;
    EXPECT_NE(config.status().message().find(named), std::string::npos) << config.status().message();
  }
  for (const nlohmann::json& positions : {nlohmann::json(0), nlohmann::json(-1), nlohmann::json(1e18),
                                           nlohmann::json(16777217), nlohmann::json("2048")}) {
    nlohmann::json config = nlohmann::json::parse(BaseConfig(""));
    config["max_position_embeddings"] = positions;
    const auto parsed = ParseModelConfig(config.dump());
    ASSERT_FALSE(parsed.ok()) << positions;
    EXPECT_NE(parsed.status().message().find("\"max_position_embeddings\""), std::string::npos)
        << parsed.status().message();
  }
}

// A config.json with fewer layers than the checkpoint holds would run a truncated model: refused naming a tensor of
// the first layer past it.
TEST(ModelConfigTest, FewerLayersThanTheCheckpointHoldsIsRefused) {
  const std::string fixture = testing::FixtureModelDir();
  const std::string folder = testing::FreshTestFolder("five-layers");
  for (const auto& entry : std::filesystem::directory_iterator(fixture))
    if (entry.path().filename() != "config.json")
      std::filesystem::create_symlink(entry.path(), std::filesystem::path(folder) / entry.path().filename());
  std::ifstream in(fixture + "/config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  ASSERT_EQ(config["num_hidden_layers"], 6);
  config["num_hidden_layers"] = 5;
  std::ofstream(folder + "/config.json") << config.dump();
  const absl::StatusOr<LoadedModel> model = OpenModel(folder);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(model.status().message().find("the checkpoint holds model.layers.5."), std::string::npos)
      << model.status().message();
  EXPECT_NE(model.status().message().find("num_hidden_layers is 5"), std::string::npos) << model.status().message();
  KVPLAN_ASSERT_OK_AND_ASSIGN(fixture_model, OpenModel(fixture));
}

// Where config.json leaves max_position_embeddings out, the architecture's transformers default applies.
TEST(ModelConfigTest, MissingContextTakesTheTransformersDefault) {
  nlohmann::json base = nlohmann::json::parse(BaseConfig(R"(, "eos_token_id": 15)"));
  base.erase("max_position_embeddings");
  for (const auto& [architecture, positions] :
       {std::pair{"LlamaForCausalLM", 2048}, {"MistralForCausalLM", 131072}, {"Qwen2ForCausalLM", 32768}}) {
    nlohmann::json config = base;
    config["architectures"] = {architecture};
    KVPLAN_ASSERT_OK_AND_ASSIGN(parsed, ParseModelConfig(config.dump()));
    EXPECT_EQ(parsed.max_position_embeddings, positions) << architecture;
    EXPECT_EQ(parsed.eos_token_id, 15);
  }
}

// Writes a safetensors file with the given header entries and raw data.
void WriteSafetensors(const std::string& path, const nlohmann::json& header, const std::string& data) {
  const std::string header_text = header.dump();
  const uint64_t length = header_text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&length), 8);
  out << header_text << data;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("kvplan_loader_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

TEST_F(SafetensorsTest, ReadsEveryFloatTypeAndSharding) {
  const float f32[2] = {1.5f, -2.25f};
  const uint16_t bf16[2] = {FloatToBf16(1.5f), FloatToBf16(-2.25f)};
  const uint16_t f16[2] = {0x3e00, 0xc080};  // 1.5, -2.25
  std::string data(reinterpret_cast<const char*>(f32), 8);
  data.append(reinterpret_cast<const char*>(bf16), 4);
  WriteSafetensors(Path("a.safetensors"),
                   {{"x", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                    {"y", {{"dtype", "BF16"}, {"shape", {1, 2}}, {"data_offsets", {8, 12}}}}},
                   data);
  WriteSafetensors(Path("b.safetensors"), {{"z", {{"dtype", "F16"}, {"shape", {2}}, {"data_offsets", {0, 4}}}}},
                   std::string(reinterpret_cast<const char*>(f16), 4));
  std::ofstream(Path("model.safetensors.index.json"))
      << R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}})";
  KVPLAN_ASSERT_OK_AND_ASSIGN(checkpoint, Checkpoint::Open(dir_.string()));
  for (const auto& [name, shape] : {std::pair{"x", std::vector<int64_t>{2}}, {"y", {1, 2}}, {"z", {2}}}) {
    KVPLAN_ASSERT_OK_AND_ASSIGN(values, checkpoint->ReadFloat(name, shape));
    EXPECT_EQ(values, (std::vector<float>{1.5f, -2.25f})) << name;
  }
  const auto wrong_shape = checkpoint->ReadFloat("x", {3});
  ASSERT_FALSE(wrong_shape.ok());
  EXPECT_NE(wrong_shape.status().message().find("\"x\""), std::string::npos);
  EXPECT_NE(wrong_shape.status().message().find("a.safetensors"), std::string::npos);
  const auto missing = checkpoint->ReadFloat("w", {2});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("\"w\""), std::string::npos);
}

TEST_F(SafetensorsTest, DamagedFilesGiveErrorsNamingTensorAndFile) {
  WriteSafetensors(Path("truncated.safetensors"),
                   {{"t", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}}, std::string(8, '\0'));
  const auto truncated = Checkpoint::OpenFile(Path("truncated.safetensors"));
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("\"t\""), std::string::npos);
  EXPECT_NE(truncated.status().message().find("truncated.safetensors"), std::string::npos);

  WriteSafetensors(Path("mismatch.safetensors"), {{"m", {{"dtype", "BF16"}, {"shape", {3}}, {"data_offsets", {0, 4}}}}},
                   std::string(4, '\0'));
  EXPECT_FALSE(Checkpoint::OpenFile(Path("mismatch.safetensors")).ok());

  WriteSafetensors(Path("int8.safetensors"), {{"q", {{"dtype", "I8"}, {"shape", {4}}, {"data_offsets", {0, 4}}}}},
                   std::string(4, '\0'));
  const auto int8 = Checkpoint::OpenFile(Path("int8.safetensors"));
  ASSERT_FALSE(int8.ok());
  EXPECT_NE(int8.status().message().find("I8"), std::string::npos);

  std::ofstream(Path("tiny.safetensors")) << "abc";
  EXPECT_FALSE(Checkpoint::OpenFile(Path("tiny.safetensors")).ok());
  std::ofstream garbage(Path("garbage.safetensors"), std::ios::binary);
  const uint64_t huge = 1ull << 40;
  garbage.write(reinterpret_cast<const char*>(&huge), 8);
  garbage << "{}";
  garbage.close();
  EXPECT_FALSE(Checkpoint::OpenFile(Path("garbage.safetensors")).ok());

  std::ofstream(Path("model.safetensors.index.json")) << R"({"weight_map": {"absent": "mismatch2.safetensors"}})";
  WriteSafetensors(Path("mismatch2.safetensors"), nlohmann::json::object(), "");
  const auto shard = Checkpoint::Open(dir_.string());
  ASSERT_FALSE(shard.ok());
  EXPECT_NE(shard.status().message().find("absent"), std::string::npos);
  EXPECT_EQ(Checkpoint::Open((dir_ / "nothing").string()).status().code(), absl::StatusCode::kNotFound);
}

TEST(Fp16Test, ConvertsSpecialValues) {
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0x0001), 5.9604645e-08f);  // smallest subnormal
  EXPECT_TRUE(std::isinf(Fp16ToFloat(0x7c00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7e00)));
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.00390625f)), 1.0f);  // ties round to even
}

}  // namespace
}  // namespace kvplan
