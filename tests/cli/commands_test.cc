// The refusals that keep a careless command from losing a file or computing nonsense, through the command
// functions and the command line; and two processes writing one plan path.
#include "cli/commands.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/atomic_file.h"
#include "base/build_info.h"
#include "base/input_file.h"
#include "cli/command_files.h"
#include "cli/command_line.h"
#include "nlohmann/json.hpp"
#include "plans/plan_io.h"
#include "tests/testing/command_line_parse.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;

std::string TestFolder(const std::string& name) { return testing::FreshTestFolder("commands_test_" + name); }

void WriteText(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string ReadText(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// A refresh-only plan for a named shape: synthetic, so it takes no calibration time, and it keeps more than any
// memory target below one.
CalibrateCommand RefreshOnlyCalibration(const std::string& output_path) {
  CalibrateCommand command = {.methods = {"refresh"}, .device = "cpu", .output_path = output_path};
  command.options.model_shape = "llama-3-8b";
  return command;
}

bool Contains(const absl::Status& status, const std::string& text) {
  return std::string(status.message()).find(text) != std::string::npos;
}

TEST(OutputFilesTest, TheModelsOwnFilesAreNeverOverwrittenEvenWithForce) {
  const std::string weights = testing::FixtureModelDir() + "/model.safetensors";
  const std::string before = ReadText(testing::FixtureModelDir() + "/config.json");
  CalibrateCommand command = RefreshOnlyCalibration(weights);
  command.options.model_shape.clear();
  command.options.model_dir = testing::FixtureModelDir();
  command.options.data_path = testing::SharedDir() + "/data/calib-sample.txt";
  command.force = true;
  const absl::Status status = RunCalibrate(command);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(Contains(status, "this command reads that file")) << status;

  // Another path to the same file (a link), and the data file as an output, are the same refusal.
  const std::string folder = TestFolder("links");
  fs::create_symlink(testing::FixtureModelDir() + "/config.json", folder + "/link.kvplan");
  command.output_path = folder + "/link.kvplan";
  EXPECT_TRUE(Contains(RunCalibrate(command), "this command reads that file"));
  command.output_path = command.options.data_path;
  EXPECT_TRUE(Contains(RunCalibrate(command), "this command reads that file"));
  EXPECT_EQ(ReadText(testing::FixtureModelDir() + "/config.json"), before);
}

TEST(OutputFilesTest, AnExistingFileIsReplacedOnlyByItsOwnKindOrWithForce) {
  const std::string folder = TestFolder("existing");
  const std::string notes = folder + "/notes.txt";
  WriteText(notes, "my notes\n");
  CalibrateCommand command = RefreshOnlyCalibration(notes);
  const absl::Status refused = RunCalibrate(command);
  EXPECT_EQ(refused.code(), absl::StatusCode::kAlreadyExists) << refused;
  EXPECT_TRUE(Contains(refused, "pass --force")) << refused;
  EXPECT_EQ(ReadText(notes), "my notes\n");

  command.force = true;
  ASSERT_TRUE(RunCalibrate(command).ok());
  EXPECT_TRUE(ReadPlanFile(notes).ok());
  // A plan replaces a plan without --force.
  command.force = false;
  EXPECT_TRUE(RunCalibrate(command).ok());

  // An eval report over a plan is refused, and checked before the model is even opened.
  const absl::Status report_over_plan = RunEval({.model_dir = testing::FixtureModelDir(),
                                                 .data_path = testing::SharedDir() + "/data/heldout-git-docs.txt",
                                                 .json_path = notes});
  EXPECT_TRUE(Contains(report_over_plan, "is not a kvplan eval report")) << report_over_plan;
  // The plan an eval reads cannot be its report either.
  const absl::Status report_over_input = RunEval({.model_dir = testing::FixtureModelDir(),
                                                  .data_path = testing::SharedDir() + "/data/heldout-git-docs.txt",
                                                  .plan_path = notes,
                                                  .json_path = notes,
                                                  .force = true});
  EXPECT_TRUE(Contains(report_over_input, "this command reads that file")) << report_over_input;
}

TEST(OutputFilesTest, AnUnwritableOutputIsReportedBeforeAnyWork) {
  const absl::Status missing_folder = RunCalibrate(RefreshOnlyCalibration("/nonexistent/plan.kvplan"));
  EXPECT_EQ(missing_folder.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(missing_folder, "/nonexistent is not a directory")) << missing_folder;
  const std::string folder = TestFolder("unwritable");
  const absl::Status into_a_file = CheckOutputFiles(
      {.writes = {{testing::FixtureModelDir() + "/config.json/plan.kvplan", OutputKind::kPlan}}}, false);
  EXPECT_EQ(into_a_file.code(), absl::StatusCode::kNotFound);
  const absl::Status onto_a_folder = CheckOutputFiles({.writes = {{folder, OutputKind::kPlan}}}, true);
  EXPECT_TRUE(Contains(onto_a_folder, "a directory")) << onto_a_folder;
}

// A device node or a FIFO is never replaced by the rename, --force or not, and never read to see what it holds;
// two outputs on one file and an empty path are refused, all before any work.
TEST(OutputFilesTest, SpecialFilesSharedAndEmptyOutputsAreRefused) {
  for (const bool force : {false, true}) {
    const absl::Status device = CheckOutputFiles({.writes = {{"/dev/null", OutputKind::kPlan}}}, force);
    EXPECT_EQ(device.code(), absl::StatusCode::kInvalidArgument) << device;
    EXPECT_TRUE(Contains(device, "/dev/null: it is a character device; name a regular file")) << device;
    EXPECT_FALSE(Contains(device, "--force")) << device;
  }
  const std::string fifo = TestFolder("special") + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const absl::Status pipe = CheckOutputFiles({.writes = {{fifo, OutputKind::kEvalReport}}}, true);
  EXPECT_TRUE(Contains(pipe, "it is a FIFO")) << pipe;

  const std::string folder = TestFolder("shared-output");
  const absl::Status shared = CheckOutputFiles(
      {.writes = {{folder + "/out.json", OutputKind::kEvalReport}, {folder + "/./out.json", OutputKind::kNeedlePrompts}}},
      false);
  EXPECT_EQ(shared.code(), absl::StatusCode::kInvalidArgument) << shared;
  EXPECT_TRUE(Contains(shared, "the eval report and the needle prompts would both be written to")) << shared;
  const absl::Status empty = CheckOutputFiles({.writes = {{"", OutputKind::kPlan}}}, false);
  EXPECT_TRUE(Contains(empty, "the plan path is empty")) << empty;
  EXPECT_TRUE(Contains(RunEval({.model_dir = testing::FixtureModelDir(),
                                .data_path = testing::SharedDir() + "/data/heldout-git-docs.txt",
                                .json_path = folder + "/same.json",
                                .needle_prompts_path = folder + "/same.json"}),
                       "would both be written to"));
}

// Inputs that never end (/dev/zero), that block (a FIFO with no writer) or that are folders are refused with their
// kind named, before a byte is read: the data file of eval and calibrate, a plan, a model's config.json.
TEST(InputFilesTest, SpecialFilesAsInputsAreRefusedWithoutReading) {
  const std::string folder = TestFolder("special-inputs");
  const std::string fifo = folder + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string data = testing::SharedDir() + "/data/heldout-git-docs.txt";
  for (const auto& [path, kind] : {std::pair<std::string, std::string>{"/dev/zero", "a character device"},
                                   {fifo, "a FIFO"},
                                   {folder, "a directory"}}) {
    const absl::Status eval = RunEval({.model_dir = testing::FixtureModelDir(), .data_path = path});
    EXPECT_EQ(eval.code(), absl::StatusCode::kInvalidArgument) << eval;
    EXPECT_TRUE(Contains(eval, "cannot read data file " + path + ": it is " + kind)) << eval;
    CalibrateCommand calibrate = {.methods = {"budget"}, .device = "cpu", .output_path = folder + "/plan.kvplan"};
    calibrate.options.model_dir = testing::FixtureModelDir();
    calibrate.options.data_path = path;
    EXPECT_TRUE(Contains(RunCalibrate(calibrate), "it is " + kind));
    EXPECT_TRUE(Contains(RunEval({.model_dir = testing::FixtureModelDir(), .data_path = data, .plan_path = path}),
                         "cannot read plan " + path + ": it is " + kind));
  }
  // A model folder whose config.json is a FIFO.
  const std::string model = folder + "/model";
  std::filesystem::create_directories(model);
  ASSERT_EQ(mkfifo((model + "/config.json").c_str(), 0600), 0);
  const absl::Status config = RunEval({.model_dir = model, .data_path = data});
  EXPECT_TRUE(Contains(config, "cannot read model config " + model + "/config.json: it is a FIFO")) << config;
}

TEST(InputFilesTest, AnInputLargerThanItsReaderAcceptsIsRefusedBeforeReading) {
  const std::string path = TestFolder("large-input") + "/ten.txt";
  ASSERT_TRUE(WriteFileAtomically(path, "0123456789").ok());
  const absl::StatusOr<std::string> small = ReadInputFile(path, "data file", 4);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(small.status(), "holds 10 bytes; at most 4 are accepted")) << small.status();
  const absl::StatusOr<std::string> whole = ReadInputFile(path, "data file", 10);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(*whole, "0123456789");
}

// bench on a model of fewer positions than its default context runs at what the model holds; --fit-memory on the CPU
// says it needs CUDA before anything else can fail.
TEST(BenchCommandTest, DefaultsFitTheModelAndFitMemoryNeedsCuda) {
  EXPECT_TRUE(RunBench({.model_dir = testing::FixtureModelDir(),
                        .steps = 2,
                        .device = "cpu",
                        .repetitions = 1,
                        .prefill = false,
                        .json = true})
                  .ok());
  const absl::Status fit = RunBench({.model_dir = testing::FixtureModelDir(), .device = "cpu", .fit_memory_gb = 1});
  EXPECT_EQ(fit.code(), absl::StatusCode::kInvalidArgument) << fit;
  EXPECT_TRUE(Contains(fit, "--fit-memory sizes a batch to GPU memory and needs the CUDA runtime")) << fit;
}

TEST(OutputFilesTest, TheModelFilesIncludeEveryShard) {
  const std::vector<std::string> files = ModelFiles(testing::FixtureModelDir());
  for (const char* name : {"/config.json", "/tokenizer.json", "/model.safetensors", "/reference.safetensors"})
    EXPECT_NE(std::find(files.begin(), files.end(), testing::FixtureModelDir() + name), files.end()) << name;
}

TEST(OutputFilesTest, TwoProcessesWritingOnePlanLeaveAWholePlan) {
  const std::string path = TestFolder("concurrent") + "/plan.kvplan";
  CalibrateCommand small = RefreshOnlyCalibration(path);
  ASSERT_TRUE(RunCalibrate(small).ok());
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, ReadPlanFile(path));
  plan::Plan other = plan;
  other.set_target_memory_ratio(0.5f);
  std::vector<pid_t> writers;
  for (const plan::Plan* each : {&plan, &other}) {
    const std::string bytes = SerializePlanFile(*each);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      bool ok = true;
      for (int i = 0; i < 50 && ok; ++i) ok = WriteFileAtomically(path, bytes).ok();
      _exit(ok ? 0 : 1);
    }
    writers.push_back(pid);
  }
  for (int i = 0; i < 50; ++i) {
    const absl::StatusOr<plan::Plan> read = ParsePlanFile(ReadText(path));
    ASSERT_TRUE(read.ok()) << read.status();
  }
  for (pid_t pid : writers) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  EXPECT_TRUE(ReadPlanFile(path).ok());
  for (const auto& entry : fs::directory_iterator(fs::path(path).parent_path()))
    EXPECT_EQ(entry.path().filename(), "plan.kvplan") << "left behind: " << entry.path();
}

TEST(LimitsTest, PositionsBeyondTheModelAreRefusedWithTheLimitNamed) {
  const std::string data = testing::SharedDir() + "/data/heldout-git-docs.txt";
  const absl::Status window =
      RunEval({.model_dir = testing::FixtureModelDir(), .data_path = data, .window = 8192, .skip_needle = true});
  EXPECT_EQ(window.code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE(Contains(window, "--window 8192 needs 8192 positions")) << window;
  EXPECT_TRUE(Contains(window, "max_position_embeddings of 2048")) << window;
  EXPECT_TRUE(Contains(window, "--allow-longer-context")) << window;
  const absl::Status needle =
      RunEval({.model_dir = testing::FixtureModelDir(), .needle_lengths = {512, 4096}, .skip_perplexity = true});
  EXPECT_TRUE(Contains(needle, "--needle-lengths 4096")) << needle;
  const absl::Status bench = RunBench({.model_dir = testing::FixtureModelDir(), .contexts = {2040}, .steps = 32});
  EXPECT_TRUE(Contains(bench, "--context 2040 and --steps 32 needs 2072 positions")) << bench;
  const absl::Status generate =
      RunGenerate({.model_dir = testing::FixtureModelDir(), .prompt = "hi", .max_new_tokens = 5000});
  EXPECT_TRUE(Contains(generate, "--max-new-tokens 5000")) << generate;
  CalibrateCommand calibrate = {.output_path = TestFolder("long") + "/plan.kvplan"};
  calibrate.options.model_dir = testing::FixtureModelDir();
  calibrate.options.data_path = testing::SharedDir() + "/data/calib-sample.txt";
  calibrate.options.sequence_length = 4096;
  const absl::Status sequences = RunCalibrate(calibrate);
  EXPECT_TRUE(Contains(sequences, "--sequence-length 4096")) << sequences;

  // Asked for, the longer context gets past the check (and here fails later for want of data).
  const absl::Status allowed = RunEval({.model_dir = testing::FixtureModelDir(),
                                        .data_path = data,
                                        .window = 4096,
                                        .max_tokens = 16,
                                        .skip_needle = true,
                                        .device = "cpu",
                                        .allow_longer_context = true});
  EXPECT_NE(allowed.code(), absl::StatusCode::kOutOfRange) << allowed;
}

TEST(LimitsTest, StrictCalibrationFailsNamingTheMethodThatStoppedShort) {
  const std::string path = TestFolder("strict") + "/plan.kvplan";
  CalibrateCommand command = RefreshOnlyCalibration(path);
  command.require_target = true;
  const absl::Status status = RunCalibrate(command);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Contains(status, "memory target 0.200 not met")) << status;
  EXPECT_TRUE(Contains(status, "no token budgets to shrink")) << status;
  EXPECT_TRUE(Contains(status, "RefreshKV")) << status;
  EXPECT_FALSE(Contains(status, "at their floor")) << status;
  EXPECT_FALSE(fs::exists(path));
  command.require_target = false;  // without --strict the plan is written and says it misses the target
  EXPECT_TRUE(RunCalibrate(command).ok());
  EXPECT_TRUE(fs::exists(path));
}

TEST(LimitsTest, CalibrationNeedsAMethod) {
  CalibrateCommand command = RefreshOnlyCalibration(TestFolder("methods") + "/plan.kvplan");
  command.methods.clear();
  const absl::Status status = RunCalibrate(command);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(status, "--methods names no method (known: budget, dict, optimise, quant, refresh, share)"))
      << status;
}

std::string ParseError(const std::vector<std::string>& arguments) { return testing::CommandLineParseError(arguments); }

TEST(CommandLineTest, EmptyListsAndNonPositiveNumbersAreRejected) {
  const std::string model = testing::FixtureModelDir();
  EXPECT_EQ(ParseError({"bench", "--model", model, "--context", "4096,512"}), "");
  EXPECT_EQ(ParseError({"bench", "--model", model, "--context", ""}), "--context: an empty value or list item");
  EXPECT_EQ(ParseError({"bench", "--model", model, "--context", "0"}), "--context: \"0\" is not a positive number");
  EXPECT_EQ(ParseError({"bench", "--model", model, "--steps", "-3"}), "--steps: \"-3\" is not a positive number");
  EXPECT_EQ(ParseError({"calibrate", "--model", model, "-o", "p", "--methods", ""}),
            "--methods: an empty value or list item");
  EXPECT_NE(ParseError({"calibrate", "--model", model, "-o", "p", "--methods", "dict,sharing"}), "");
  EXPECT_NE(ParseError({"calibrate", "--model", model, "-o", "p", "--target-memory", "1.5"}), "");
  EXPECT_NE(ParseError({"calibrate", "--model", model, "-o", "p", "--atoms", "70000"}), "");
  EXPECT_EQ(ParseError({"calibrate", "--model", model, "-o", "p", "--exempt-layers", "-1"}), "");
  EXPECT_NE(ParseError({"eval", "--model", model, "--needle-trials", "0"}), "");
  EXPECT_NE(ParseError({"eval", "--model", model, "--data", "/nonexistent/data.txt"}), "");
  EXPECT_NE(ParseError({"eval", "--model", "/nonexistent/model"}), "");
  EXPECT_NE(ParseError({"inspect", "/nonexistent/plan.kvplan"}), "");
  // An empty output path once calibrated for the whole run, or made eval write nothing and succeed.
  EXPECT_EQ(ParseError({"calibrate", "--model", model, "-o", ""}), "--output: an empty value or list item");
  EXPECT_EQ(ParseError({"eval", "--model", model, "--json", ""}), "--json: an empty value or list item");
  EXPECT_EQ(ParseError({"eval", "--model", model, "--needle-prompts", ""}),
            "--needle-prompts: an empty value or list item");
}

TEST(CommandLineTest, EveryHelpShowsTheDefaults) {
  CommandLine command_line;
  const std::string eval = command_line.app().get_subcommand("eval")->help();
  EXPECT_NE(eval.find("--window INT:INT in [2 - 1073741824]=2048"), std::string::npos) << eval;
  EXPECT_NE(eval.find("--needle-lengths INT:NONEMPTY:a positive number=[512,1024,2048]"), std::string::npos) << eval;
  const std::string bench = command_line.app().get_subcommand("bench")->help();
  EXPECT_NE(bench.find("--repetitions INT:INT in [1 - 1000]=3"), std::string::npos) << bench;
  EXPECT_NE(bench.find("--device TEXT:{auto,cpu,cuda}=auto"), std::string::npos) << bench;
  // Every option that has a value shows it.
  for (CLI::App* subcommand : command_line.app().get_subcommands({})) {
    const std::string help = subcommand->help();
    for (const CLI::Option* option : subcommand->get_options()) {
      if (option->get_default_str().empty() || option->get_type_size() == 0) continue;
      EXPECT_NE(help.find(absl::StrCat("=", option->get_default_str())), std::string::npos)
          << subcommand->get_name() << " " << option->get_name();
    }
  }
}

TEST(CommandLineTest, VersionNamesTheBuildOptions) {
  const std::string version = ParseError({"--version"});
  EXPECT_EQ(version.rfind(std::string("kvplan ") + kKvplanVersion + "\n", 0), 0u) << version;
  EXPECT_NE(version.find(kBuiltWithCuda ? "CUDA: on (architectures " : "CUDA: off"), std::string::npos) << version;
  EXPECT_NE(version.find("build: "), std::string::npos) << version;
}

TEST(CommandLineTest, NamedChoicesAreChecked) {
  const std::string model = testing::FixtureModelDir();
  EXPECT_NE(ParseError({"bench", "--model", model, "--device", "gpu"}), "");
  EXPECT_NE(ParseError({"bench", "--shape", "llama-4"}), "");
  EXPECT_NE(ParseError({"bench", "--model", model, "--repetitions", "0"}), "");
  EXPECT_NE(ParseError({"calibrate", "--model", model, "-o", "p", "--scoring", "norm"}), "");
  EXPECT_EQ(ParseError({"calibrate", "--model", model, "-o", "p", "--key-coding", "post-rope", "--quiet"}), "");
}

TEST(BenchTest, JsonHoldsTheMedianAndRangeOfEveryContext) {
  ::testing::internal::CaptureStdout();
  const absl::Status status = RunBench({.model_dir = testing::FixtureModelDir(),
                                        .contexts = {16, 40},
                                        .steps = 2,
                                        .device = "cpu",
                                        .repetitions = 2,
                                        .json = true});
  const std::string output = ::testing::internal::GetCapturedStdout();
  ASSERT_TRUE(status.ok()) << status;
  const nlohmann::json report = nlohmann::json::parse(output, nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(report.is_object()) << output;
  EXPECT_EQ(report["schema_version"], 1);
  EXPECT_EQ(report["repetitions"], 2);
  EXPECT_EQ(report["device"], "cpu");
  ASSERT_EQ(report["results"].size(), 2u);
  for (const nlohmann::json& result : report["results"]) {
    const nlohmann::json& decode = result["decode"]["tokens_per_second"];
    EXPECT_LE(decode["min"].get<double>(), decode["median"].get<double>()) << result;
    EXPECT_LE(decode["median"].get<double>(), decode["max"].get<double>()) << result;
    EXPECT_GT(decode["min"].get<double>(), 0) << result;
    EXPECT_EQ(result["prefill"]["tokens"], result["context"]) << result;
    EXPECT_GT(result["prefill"]["tokens_per_second"]["median"].get<double>(), 0) << result;
    EXPECT_GT(result["kv_bytes"].get<int64_t>(), 0) << result;
  }
  EXPECT_EQ(report["results"][1]["context"], 40);
}

TEST(ProgressTest, LogsGetStageLinesAndQuietGetsNothing) {
  EvalCommand command = {.model_dir = testing::FixtureModelDir(),
                         .data_path = testing::SharedDir() + "/data/heldout-git-docs.txt",
                         .window = 64,
                         .max_tokens = 128,
                         .skip_needle = true,
                         .device = "cpu"};
  ::testing::internal::CaptureStderr();  // a file, not a terminal: no bar
  ASSERT_TRUE(RunEval(command).ok());
  const std::string logged = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(logged.find("perplexity ...\n"), std::string::npos) << logged;
  EXPECT_NE(logged.find("perplexity done in "), std::string::npos) << logged;
  EXPECT_EQ(logged.find('\r'), std::string::npos) << logged;
  command.quiet = true;
  ::testing::internal::CaptureStderr();
  ASSERT_TRUE(RunEval(command).ok());
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

}  // namespace
}  // namespace kvplan
