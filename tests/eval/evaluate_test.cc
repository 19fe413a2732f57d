// Evaluation protocols on the fixture: document splitting, needle prompts, perplexity windows, the comparison
// with the full cache, the JSON report, and the CLI commands' errors for bad input.
#include "eval/evaluate.h"

#include <cmath>
#include <fstream>

#include "cli/commands.h"
#include "eval/eval_report.h"
#include "loader/documents.h"
#include "loader/model_files.h"
#include "loader/open_model.h"
#include "nlohmann/json.hpp"
#include "plans/plan_io.h"
#include "runtime/cpu/cpu_model.h"
#include "tests/testing/plan_cases.h"
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
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(ModelFile(testing::FixtureModelDir(), "tokenizer.json")));
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
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  const Tokenizer* tokenizer = loaded.tokenizer.get();
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

// The fixture's held-out token stream, cut at max_tokens.
std::vector<int32_t> HeldOutTokens(int64_t max_tokens) {
  auto tokenizer = Tokenizer::Load(ModelFile(testing::FixtureModelDir(), "tokenizer.json"));
  auto text = ReadTextFile(testing::SharedDir() + "/data/heldout-git-docs.txt");
  EXPECT_TRUE(tokenizer.ok() && text.ok());
  return TokenizeDocuments(**tokenizer, SplitDocuments(*text), 0, max_tokens);
}

// Layer 4 reads layer 2's cache: every position's logits change, however short the window.
plan::Plan SharingPlan(const LoadedModel& loaded) {
  return testing::CompileTestPlan({.name = "share", .share = true}, loaded, {});
}

TEST(EvaluateTest, AModelComparedWithItselfHasNoDivergence) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(model, CreateCpuModel(loaded.config, *loaded.weights, {.capacity = 256}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(twin, CreateCpuModel(loaded.config, *loaded.weights, {.capacity = 256}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(compared,
                              ComparePerplexity(*model, *twin, HeldOutTokens(256), {.window = 256, .max_tokens = 256}));
  EXPECT_EQ(compared.model.scored_tokens, 255);
  EXPECT_EQ(compared.reference.scored_tokens, 255);
  EXPECT_DOUBLE_EQ(compared.model.perplexity, compared.reference.perplexity);
  EXPECT_NEAR(compared.divergence.kl_mean, 0.0, 1e-9);
  EXPECT_NEAR(compared.divergence.kl_max, 0.0, 1e-9);
  EXPECT_EQ(compared.divergence.top1_agreement, 1.0);
  EXPECT_EQ(compared.divergence.top1_standard_error, 0.0);
}

TEST(EvaluateTest, APlanDivergesFromTheFullCacheWithShrinkingErrors) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  const plan::Plan plan = SharingPlan(loaded);
  KVPLAN_ASSERT_OK_AND_ASSIGN(planned, CreatePlannedCpuModel(loaded.config, *loaded.weights, plan, {.capacity = 64}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(full, CreateCpuModel(loaded.config, *loaded.weights, {.capacity = 64}));
  const std::vector<int32_t> tokens = HeldOutTokens(256);
  KVPLAN_ASSERT_OK_AND_ASSIGN(one_window, ComparePerplexity(*planned, *full, tokens, {.window = 64, .max_tokens = 64}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(four_windows,
                              ComparePerplexity(*planned, *full, tokens, {.window = 64, .max_tokens = 256}));
  const DivergenceResult& divergence = four_windows.divergence;
  EXPECT_GT(divergence.kl_mean, 1e-3);
  EXPECT_LE(divergence.kl_p99, divergence.kl_max);
  EXPECT_GT(divergence.kl_max, divergence.kl_mean);
  EXPECT_LT(divergence.top1_agreement, 1.0);
  EXPECT_GT(divergence.top1_agreement, 0.3);
  EXPECT_NE(four_windows.model.perplexity, four_windows.reference.perplexity);
  // The reference's numbers are the full cache's own.
  KVPLAN_ASSERT_OK_AND_ASSIGN(alone, EvaluatePerplexity(*full, tokens, {.window = 64, .max_tokens = 64}));
  EXPECT_DOUBLE_EQ(one_window.reference.perplexity, alone.perplexity);
  EXPECT_DOUBLE_EQ(one_window.reference.standard_error, alone.standard_error);
  // Four times the tokens: standard errors about halve.
  for (auto [few, many] : {std::pair{one_window.divergence.kl_standard_error, divergence.kl_standard_error},
                           {one_window.divergence.top1_standard_error, divergence.top1_standard_error},
                           {one_window.model.standard_error, four_windows.model.standard_error},
                           {one_window.reference.standard_error, four_windows.reference.standard_error}}) {
    EXPECT_TRUE(std::isfinite(few) && std::isfinite(many));
    EXPECT_GT(many, 0.0);
    EXPECT_LT(many, few);
  }
}

TEST(EvaluateTest, ReportJsonCarriesTheSchemaAndEveryMeasurement) {
  EvalReport report{.device = "cpu+plan",
                    .plan_path = "p.kvplan",
                    .perplexity = PerplexityResult{.perplexity = 27.0, .standard_error = 0.5, .scored_tokens = 10},
                    .reference_perplexity = PerplexityResult{.perplexity = 20.0, .scored_tokens = 10},
                    .divergence = DivergenceResult{.kl_mean = 0.25, .kl_p99 = 3.0, .top1_agreement = 0.75},
                    .needle = {{.context_length = 512, .correct = 3, .trials = 4, .reference_correct = 4}},
                    .kv_bytes = 100,
                    .full_kv_bytes = 300};
  report.divergence->top1_standard_error = std::nan("");
  const nlohmann::json json = nlohmann::json::parse(EvalReportJson(report));
  EXPECT_EQ(json["schema_version"], kEvalReportSchemaVersion);
  EXPECT_EQ(json["plan"], "p.kvplan");
  EXPECT_EQ(json["perplexity"]["value"], 27.0);
  EXPECT_EQ(json["perplexity"]["standard_error"], 0.5);
  EXPECT_EQ(json["reference"]["perplexity"]["value"], 20.0);
  EXPECT_EQ(json["kl_divergence"]["mean"], 0.25);
  EXPECT_EQ(json["kl_divergence"]["p99"], 3.0);
  EXPECT_EQ(json["top1_agreement"]["value"], 0.75);
  EXPECT_TRUE(json["top1_agreement"]["standard_error"].is_null());  // an unknown spread, not a number
  EXPECT_EQ(json["needle"][0]["accuracy"], 0.75);
  EXPECT_EQ(json["needle"][0]["reference_correct"], 4);
  EXPECT_EQ(json["full_kv_bytes"], 300);
  const std::string text = EvalReportText(report);
  EXPECT_NE(text.find("27.0000 ± 0.5000"), std::string::npos) << text;
  EXPECT_NE(text.find("top-1 agreement 75.00"), std::string::npos) << text;

  // Without a plan there is nothing to compare: no reference, no divergence, a null plan.
  const nlohmann::json full = nlohmann::json::parse(EvalReportJson({.device = "cpu"}));
  EXPECT_TRUE(full["plan"].is_null());
  for (const char* key : {"perplexity", "reference", "kl_divergence", "top1_agreement", "needle"})
    EXPECT_FALSE(full.contains(key)) << key;
}

TEST(CommandsTest, EvalOfAPlanWritesItsComparisonWithTheFullCache) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  const std::string plan_path = ::testing::TempDir() + "/evaluate_test.kvplan";
  ASSERT_TRUE(WritePlanFile(SharingPlan(loaded), plan_path).ok());
  const std::string json_path = ::testing::TempDir() + "/evaluate_test.json";
  const absl::Status status = RunEval({.model_dir = testing::FixtureModelDir(),
                                       .data_path = testing::SharedDir() + "/data/heldout-git-docs.txt",
                                       .window = 128,
                                       .max_tokens = 128,
                                       .needle_lengths = {128},
                                       .needle_trials = 1,
                                       .device = "cpu",
                                       .plan_path = plan_path,
                                       .json_path = json_path});
  ASSERT_TRUE(status.ok()) << status;
  const nlohmann::json json = nlohmann::json::parse(std::ifstream(json_path), nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(json.is_discarded());
  EXPECT_EQ(json["schema_version"], 1);
  EXPECT_EQ(json["plan"], plan_path);
  EXPECT_EQ(json["perplexity"]["scored_tokens"], 127);
  EXPECT_GT(json["kl_divergence"]["mean"].get<double>(), 0.0);
  EXPECT_TRUE(json["reference"]["perplexity"].contains("standard_error"));
  ASSERT_EQ(json["needle"].size(), 1u);
  EXPECT_EQ(json["needle"][0]["trials"], 1);
  EXPECT_TRUE(json["needle"][0].contains("reference_correct"));
  EXPECT_LT(json["kv_bytes"].get<int64_t>(), json["full_kv_bytes"].get<int64_t>());
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
