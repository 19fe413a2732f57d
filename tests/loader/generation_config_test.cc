// The generation settings of a model folder: stop ids from config.json and generation_config.json (ids or
// lists), the chat template (a string, or named templates) and special tokens (strings or added-token objects).
#include "loader/generation_config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;

class GenerationConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("kvplan_generation_config_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) { std::ofstream(dir_ / name) << text; }

  fs::path dir_;
};

TEST_F(GenerationConfigTest, FixtureModel) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(generation, LoadGenerationConfig(testing::FixtureModelDir()));
  EXPECT_EQ(generation.stop_token_ids, std::vector<int32_t>({1}));
  EXPECT_EQ(generation.chat_template, "");
  EXPECT_EQ(generation.bos_token, "<|begin_of_text|>");
  EXPECT_EQ(generation.eos_token, "<|end_of_text|>");
}

TEST_F(GenerationConfigTest, EveryStopIdOfBothFilesAndNamedTemplates) {
  Write("config.json", R"({"eos_token_id": 7})");
  Write("generation_config.json", R"({"eos_token_id": [9, 7, 8]})");
  Write("tokenizer_config.json",
        R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"})");
  KVPLAN_ASSERT_OK_AND_ASSIGN(generation, LoadGenerationConfig(dir_.string()));
  EXPECT_EQ(generation.stop_token_ids, std::vector<int32_t>({7, 9, 8}));
  EXPECT_EQ(generation.chat_template, "D");
  EXPECT_EQ(generation.bos_token, "<s>");
  EXPECT_EQ(generation.eos_token, "</s>");
}

TEST_F(GenerationConfigTest, BadFieldsAreNamed) {
  const std::pair<std::string, std::string> cases[] = {
      {R"({"eos_token_id": "2"})", "eos_token_id"},  {R"({"eos_token_id": [1, -3]})", "eos_token_id"},
      {R"({"eos_token_id": 1e30})", "eos_token_id"}, {R"([1, 2])", "not a JSON object"},
      {R"({"eos_token_id": )", "not valid JSON"},
  };
  for (const auto& [text, named] : cases) {
    Write("generation_config.json", text);
    absl::StatusOr<GenerationConfig> generation = LoadGenerationConfig(dir_.string());
    ASSERT_FALSE(generation.ok()) << text;
    EXPECT_NE(generation.status().message().find(named), std::string::npos) << generation.status();
    EXPECT_NE(generation.status().message().find("generation_config.json"), std::string::npos) << generation.status();
  }
  fs::remove(dir_ / "generation_config.json");
  Write("tokenizer_config.json", R"({"chat_template": 3})");
  EXPECT_FALSE(LoadGenerationConfig(dir_.string()).ok());
}

}  // namespace
}  // namespace kvplan
