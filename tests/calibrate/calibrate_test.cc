// End to end on a small budget: calibrate every method from the calibration sample, write the plan, read it
// back, validate it against the model and run it.
#include "calibrate/calibrate.h"

#include "absl/strings/match.h"
#include "eval/evaluate.h"
#include "loader/documents.h"
#include "loader/open_model.h"
#include "loader/tokenizer.h"
#include "planner/planner.h"
#include "plans/plan_io.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/cpu/cpu_model.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

CalibrateOptions SmallOptions() {
  CalibrateOptions options;
  options.model_dir = testing::FixtureModelDir();
  options.data_path = testing::SharedDir() + "/data/calib-sample.txt";
  options.sequences = 3;
  options.sequence_length = 128;
  options.dictionary_atoms = 64;
  options.dictionary_epochs = 2;
  options.max_training_vectors = 1024;
  options.share_cosine_threshold = 0.5f;
  options.max_shared_layers = 1;
  options.target_memory_ratio = 0.25f;
  return options;
}

TEST(CalibrateTest, EveryMethodEndToEnd) {
  std::vector<std::string> stages;
  CalibrationReport report;
  CalibrateOptions options = SmallOptions();
  options.device = Backend::kCpu;
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, Calibrate(
                                        options,
                                        [&](const std::string& stage, int64_t, int64_t) {
                                          if (stages.empty() || stages.back() != stage) stages.push_back(stage);
                                        },
                                        &report));
  const std::vector<std::string> expected_stages = {"loading the model", "statistics", "layer sharing search",
                                                    "dictionaries", "compiling the plan"};
  EXPECT_EQ(stages, expected_stages);
  // The report times the same stages, counts the candidates the search ran and knows no device memory.
  ASSERT_EQ(report.stage_seconds.size(), expected_stages.size());
  for (size_t i = 0; i < expected_stages.size(); ++i) {
    EXPECT_EQ(report.stage_seconds[i].first, expected_stages[i]);
    EXPECT_GE(report.stage_seconds[i].second, 0.0);
  }
  EXPECT_EQ(report.device, "cpu");
  EXPECT_GT(report.share_candidates, 0);
  EXPECT_GT(report.seconds_per_share_candidate, 0.0);
  EXPECT_EQ(report.peak_device_bytes, 0);
  EXPECT_EQ(plan.sharing().shares_size(), 1);
  EXPECT_GT(plan.sparse_coding().layers_size(), 0);
  EXPECT_GT(plan.budgets().layers_size(), 0);
  EXPECT_GT(plan.refresh().layers_size(), 0);
  for (const auto& layer : plan.sparse_coding().layers()) {
    EXPECT_GT(layer.keys().relative_error(), 0.0f);
    EXPECT_LT(layer.keys().relative_error(), 1.0f);
  }

  const std::string path = ::testing::TempDir() + "/calibrate_test.kvplan";
  ASSERT_TRUE(WritePlanFile(plan, path).ok());
  KVPLAN_ASSERT_OK_AND_ASSIGN(read, ReadPlanFile(path));
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  KVPLAN_ASSERT_OK_AND_ASSIGN(model, CreatePlannedCpuModel(loaded.config, *loaded.weights, read, {.capacity = 512}));
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(testing::FixtureModelDir() + "/tokenizer.json"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(text, ReadTextFile(testing::SharedDir() + "/data/heldout-git-docs.txt"));
  const std::vector<int32_t> tokens = TokenizeDocuments(*tokenizer, SplitDocuments(text), 0, 512);
  KVPLAN_ASSERT_OK_AND_ASSIGN(result, EvaluatePerplexity(*model, tokens, {.window = 512, .max_tokens = 512}));
  EXPECT_TRUE(std::isfinite(result.perplexity));
  EXPECT_LT(result.perplexity, 200.0);
  // The calibrated plan, every method at once: the runtime holds exactly the bytes the planner predicted.
  EXPECT_EQ(model->cached_positions(), 512);
  EXPECT_EQ(model->kv_cache_bytes(), PlanCacheBytes(read, 512));
  EXPECT_LT(model->kv_cache_bytes(),
            FullCacheBytes(loaded.config.num_layers, loaded.config.num_kv_heads, loaded.config.head_dim, 512));
}

// The quality optimiser on a small grid: every layer gets a measured decision, the plan meets the target, and
// its verification ran on the held-back sequences.
TEST(CalibrateTest, OptimiserChoosesMeasuredSettingsAndVerifiesThem) {
  CalibrateOptions options = SmallOptions();
  options.device = Backend::kCpu;
  options.methods = {"optimise"};
  options.sequences = 4;
  options.sequence_length = 64;
  options.optimiser_widths = {4};
  options.optimiser_keep_fractions = {0.5f};
  options.quantization_recent_window = 16;
  options.retrieval_probes = 1;
  options.target_memory_ratio = 0.5f;
  std::vector<std::string> stages;
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, Calibrate(options, [&](const std::string& stage, int64_t, int64_t) {
                                if (stages.empty() || stages.back() != stage) stages.push_back(stage);
                              }));
  const std::vector<std::string> expected_stages = {"loading the model", "statistics", "optimiser: measuring settings",
                                                    "compiling the plan", "optimiser: verifying the plan"};
  EXPECT_EQ(stages, expected_stages);
  EXPECT_TRUE(CheckMemoryTarget(plan).ok()) << CheckMemoryTarget(plan);
  const plan::OptimiserDecisions& decisions = plan.optimiser();
  EXPECT_EQ(decisions.layers_size(), 6);
  EXPECT_EQ(decisions.candidates_measured(), 6 * 3);
  EXPECT_EQ(decisions.verified_tokens(), 2 * 64);
  EXPECT_GT(decisions.verified_kl(), 0.0);
  EXPECT_GT(decisions.verified_top1_agreement(), 0.5);
  EXPECT_GT(decisions.verified_probe_top1_agreement(), 0.0);  // the probe's answer rows were scored
  EXPECT_FLOAT_EQ(decisions.retrieval_weight(), options.retrieval_weight);
  for (const auto& entry : plan.quantization().layers()) EXPECT_EQ(entry.key_channel_scale_size(), 2 * 64);

  options.methods = {"optimise", "budget"};
  EXPECT_TRUE(absl::StrContains(Calibrate(options).status().message(), "drop budget"));
  options.methods = {"optimise"};
  options.sequences = 3;  // 2 to measure and 2 to verify need 4
  EXPECT_EQ(Calibrate(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CalibrateTest, BadOptionsAreRejected) {
  CalibrateOptions options = SmallOptions();
  options.methods = {"share", "quantize"};
  const auto unknown = Calibrate(options);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("quantize"), std::string::npos);
  options = SmallOptions();
  options.target_memory_ratio = 3.0f;
  EXPECT_FALSE(Calibrate(options).ok());
  options = SmallOptions();
  options.random_tokens = true;  // only a random-weight shape calibrates on random tokens
  EXPECT_EQ(Calibrate(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = SmallOptions();
  options.data_path = "/nonexistent/calib.txt";
  EXPECT_EQ(Calibrate(options).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvplan
