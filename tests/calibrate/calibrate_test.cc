// End to end on a small budget: calibrate every method from the calibration sample, write the plan, read it
// back, validate it against the model and run it.
#include "calibrate/calibrate.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/build_info.h"
#include "calibrate/session.h"
#include "eval/evaluate.h"
#include "loader/documents.h"
#include "loader/open_model.h"
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
  EXPECT_EQ(plan.calibration().tool_version(), absl::StrCat("kvplan ", kKvplanVersion));
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
  KVPLAN_ASSERT_OK_AND_ASSIGN(text, ReadTextFile(testing::SharedDir() + "/data/heldout-git-docs.txt"));
  const std::vector<int32_t> tokens = TokenizeDocuments(*loaded.tokenizer, SplitDocuments(text), 0, 512);
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
  options.methods = {CalibrationMethod::kOptimise};
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

  options.methods = {CalibrationMethod::kOptimise, CalibrationMethod::kBudget};
  EXPECT_TRUE(absl::StrContains(Calibrate(options).status().message(), "drop budget"));
  options.methods = {CalibrationMethod::kOptimise};
  options.sequences = 3;  // 2 to measure and 2 to verify need 4
  EXPECT_EQ(Calibrate(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// `kvplan sweep` calibrates every point over one session: each plan is byte for byte the one a calibration that
// opens the model itself writes, and a session refuses options that read other data.
TEST(CalibrateTest, CalibrationsOverOneSessionMatchSeparateOnes) {
  CalibrateOptions options = SmallOptions();
  options.device = Backend::kCpu;
  options.sequences = 2;
  options.sequence_length = 64;
  CalibrationReport opening;
  KVPLAN_ASSERT_OK_AND_ASSIGN(session, [&] {
    StageClock clock(nullptr, opening, false);
    return CalibrationSession::Open(options, clock);
  }());
  ASSERT_EQ(opening.stage_seconds.size(), 1u);
  EXPECT_EQ(opening.stage_seconds[0].first, "loading the model");
  EXPECT_EQ(session->sequences().size(), 2u);
  using enum CalibrationMethod;
  for (const CalibrationMethods& methods : {CalibrationMethods{kShare, kBudget, kRefresh}, CalibrationMethods{kQuant},
                                            CalibrationMethods{kDict, kBudget}}) {
    options.methods = methods;
    CalibrationReport report;
    KVPLAN_ASSERT_OK_AND_ASSIGN(over_session, Calibrate(options, *session, nullptr, &report));
    KVPLAN_ASSERT_OK_AND_ASSIGN(alone, Calibrate(options));
    EXPECT_EQ(over_session.SerializeAsString(), alone.SerializeAsString());
    EXPECT_EQ(report.device, "cpu");
    EXPECT_NE(report.stage_seconds.front().first, "loading the model");
  }
  options.sequence_length = 32;
  EXPECT_EQ(Calibrate(options, *session).status().code(), absl::StatusCode::kInvalidArgument);
}

// The synthetic plan of a random-weight shape is stamped with the version too.
TEST(CalibrateTest, SyntheticPlanCarriesTheVersion) {
  CalibrateOptions options;
  options.model_shape = "llama-3-8b";
  options.methods = {CalibrationMethod::kBudget, CalibrationMethod::kQuant};
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, Calibrate(options));
  EXPECT_EQ(plan.calibration().tool_version(), absl::StrCat("kvplan ", kKvplanVersion));
  EXPECT_EQ(plan.quantization().layers_size(), 32);
  options.methods = {CalibrationMethod::kShare};
  EXPECT_EQ(Calibrate(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CalibrateTest, MethodsAreParsedOnceNamingAnUnknownOne) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(methods, ParseCalibrationMethods({"share", "quant", "share"}));
  EXPECT_EQ(methods, (CalibrationMethods{CalibrationMethod::kShare, CalibrationMethod::kQuant}));
  EXPECT_FALSE(methods.contains(CalibrationMethod::kDict));
  for (const std::string& name : CalibrationMethodNames()) {
    KVPLAN_ASSERT_OK_AND_ASSIGN(one, ParseCalibrationMethods({name}));
    EXPECT_FALSE(one.empty()) << name;
  }
  const auto unknown = ParseCalibrationMethods({"share", "quantize"});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(unknown.status().message(),
                                "unknown method \"quantize\" (known: budget, dict, optimise, quant, refresh, share)"))
      << unknown.status();
}

TEST(CalibrateTest, BadOptionsAreRejected) {
  CalibrateOptions options = SmallOptions();
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
