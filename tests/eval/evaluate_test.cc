// Evaluation protocols on the fixture: document splitting, needle prompts, perplexity windows, and the CLI
// commands' errors for bad input.
#include "eval/evaluate.h"
#include "loader/documents.h"

#include "cli/commands.h"
#include "runtime/cpu/cpu_model.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

TEST(EvaluateTest, SplitsDocumentsOnMarkerLines) {
  const std::vector<std::string> documents = SplitDocuments("a\nb\n<|doc|>\nc\n<|doc|>\n<|doc|>\nd <|doc|> e\n");
  ASSERT_EQ(documents.size(), 3u);
  EXPECT_EQ(documents[0], "a\nb\n");
  EXPECT_EQ(documents[1], "c\n");
  EXPECT_EQ(documents[2], "d <|doc|> e\n");
}

TEST(EvaluateTest, NeedlePromptHoldsTheKeyAndFitsTheContext) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(testing::FixtureModelDir() + "/tokenizer.json"));
  for (double depth : {0.0, 0.5, 1.0}) {
    const std::vector<int32_t> prompt = NeedlePrompt(*tokenizer, 0, 512, 48213, depth);
    EXPECT_LE(prompt.size(), 512u);
    EXPECT_GT(prompt.size(), 400u);
    EXPECT_EQ(prompt[0], 0);
    const std::string text = tokenizer->Decode(prompt);
    EXPECT_NE(text.find("The pass key is 48213. Remember it. 48213 is the pass key."), std::string::npos);
    EXPECT_TRUE(text.ends_with("What is the pass key? The pass key is"));
  }
  const NeedleOptions options{.context_lengths = {256, 512}, .trials = 3};
  const std::vector<NeedleTrial> trials = NeedleTrials(*tokenizer, 0, options);
  ASSERT_EQ(trials.size(), 6u);
  EXPECT_EQ(trials[3].context_length, 512);
  EXPECT_EQ(NeedleTrials(*tokenizer, 0, options)[4].pass_key, trials[4].pass_key);  // seeded
}

TEST(EvaluateTest, PerplexityAndNeedleOnTheFixture) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModelDirectory(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(testing::FixtureModelDir() + "/tokenizer.json"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(model, CreateCpuModel(loaded.config, *loaded.weights, {.capacity = 512}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(text, ReadTextFile(testing::SharedDir() + "/data/heldout-git-docs.txt"));
  const std::vector<int32_t> tokens = TokenizeDocuments(*tokenizer, SplitDocuments(text), 0, 1024);
  ASSERT_EQ(tokens.size(), 1024u);
  KVPLAN_ASSERT_OK_AND_ASSIGN(result, EvaluatePerplexity(*model, tokens, {.window = 512, .max_tokens = 1024}));
  EXPECT_EQ(result.windows, 2);
  EXPECT_EQ(result.scored_tokens, 1022);
  // Full-window perplexity is ~20.9 (baseline.json: 20.7); shorter windows see less context.
  EXPECT_GT(result.perplexity, 10.0);
  EXPECT_LT(result.perplexity, 60.0);
  KVPLAN_ASSERT_OK_AND_ASSIGN(needles, EvaluateNeedle(*model, *tokenizer, {.context_lengths = {256}, .trials = 2}));
  ASSERT_EQ(needles.size(), 1u);
  EXPECT_EQ(needles[0].trials, 2);
  EXPECT_FALSE(EvaluatePerplexity(*model, tokens, {.window = 4096}).ok());  // beyond the cache
}

TEST(CommandsTest, BadInputGivesErrorsNamingTheProblem) {
  const absl::Status missing_model = RunEval({.model_dir = "/nonexistent/model", .data_path = "x"});
  EXPECT_EQ(missing_model.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing_model.message().find("/nonexistent/model"), std::string::npos);
  const absl::Status missing_data =
      RunEval({.model_dir = testing::FixtureModelDir(), .data_path = "/nonexistent/data.txt", .skip_needle = true});
  EXPECT_NE(missing_data.message().find("/nonexistent/data.txt"), std::string::npos);
  const absl::Status missing_plan = RunEval({.model_dir = testing::FixtureModelDir(),
                                             .data_path = "x",
                                             .skip_needle = true,
                                             .plan_path = "/nonexistent/p.kvplan"});
  EXPECT_NE(missing_plan.message().find("p.kvplan"), std::string::npos);
  const absl::Status bad_device =
      RunGenerate({.model_dir = testing::FixtureModelDir(), .prompt = "hi", .device = "tpu"});
  EXPECT_NE(bad_device.message().find("tpu"), std::string::npos);
  const absl::Status both = RunBench({.model_dir = testing::FixtureModelDir(), .model_shape = "llama-3-8b"});
  EXPECT_FALSE(both.ok());
  const absl::Status unknown_shape = RunBench({.model_shape = "gpt-5"});
  EXPECT_NE(unknown_shape.message().find("gpt-5"), std::string::npos);
}

}  // namespace
}  // namespace kvplan
