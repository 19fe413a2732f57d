// `kvplan sweep` end to end on the fixture (a tiny grid through the command: the CSV table and the SVG plot it
// writes), the report writers on hand-made rows, the method presets, and the refusals of bad input.
#include "sweep/sweep.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "cli/command_line.h"
#include "cli/commands.h"
#include "sweep/sweep_report.h"
#include "tests/testing/command_line_parse.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;

std::string TestFolder(const std::string& name) { return testing::FreshTestFolder("sweep_test_" + name); }

std::string ReadText(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

size_t Count(const std::string& text, const std::string& part) {
  size_t count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

// The CSV as rows of cells, the header first.
std::vector<std::vector<std::string>> CsvRows(const std::string& csv) {
  std::vector<std::vector<std::string>> rows;
  for (absl::string_view line : absl::StrSplit(csv, '\n', absl::SkipEmpty())) rows.push_back(absl::StrSplit(line, ','));
  return rows;
}

// Empty when every tag of `xml` is closed in order and the root element is <svg>; otherwise what is wrong.
// Enough XML for what SweepSvg writes: elements, attributes without '>' in them, text, no comments or CDATA.
std::string XmlStructureError(const std::string& xml) {
  std::vector<std::string> open;
  std::string root;
  for (size_t at = xml.find('<'); at != std::string::npos; at = xml.find('<', at + 1)) {
    const size_t end = xml.find('>', at);
    if (end == std::string::npos) return "unterminated tag";
    const std::string tag = xml.substr(at + 1, end - at - 1);
    if (tag.starts_with("/")) {
      if (open.empty() || open.back() != tag.substr(1)) return "misplaced </" + tag.substr(1) + ">";
      open.pop_back();
      continue;
    }
    const std::string name = tag.substr(0, tag.find_first_of(" /"));
    if (root.empty()) root = name;
    if (open.empty() && name != root) return "second root <" + name + ">";
    if (!tag.ends_with("/")) open.push_back(name);
  }
  if (!open.empty()) return "<" + open.back() + "> not closed";
  return root == "svg" ? "" : "root is <" + root + ">";
}

// A grid small enough for a unit test: one 128-token window, two needle trials, three short calibration sequences.
SweepCommand TinySweep(const std::string& folder) {
  SweepCommand command = {.device = "cpu", .output_path = folder + "/sweep.csv", .svg_path = folder + "/sweep.svg"};
  SweepOptions& options = command.options;
  options.calibration.model_dir = testing::FixtureModelDir();
  options.calibration.data_path = testing::SharedDir() + "/data/calib-sample.txt";
  options.calibration.sequences = 3;
  options.calibration.sequence_length = 128;
  options.eval_data_path = testing::SharedDir() + "/data/heldout-git-docs.txt";
  options.methods = {"budget-l2", "budget-attn"};
  options.targets = {0.5f, 0.25f};
  options.perplexity = {.window = 128, .max_tokens = 128};
  options.needle.trials = 2;
  return command;
}

TEST(SweepTest, TinyGridWritesTheTableAndThePlot) {
  const std::string folder = TestFolder("tiny");
  const SweepCommand command = TinySweep(folder);
  const absl::Status status = RunSweep(command);
  ASSERT_TRUE(status.ok()) << status;

  const std::vector<std::vector<std::string>> rows = CsvRows(ReadText(command.output_path));
  const std::vector<std::string> header = {
      "method",     "target",          "meets_target",         "context", "kv_bytes", "full_kv_bytes",  "kv_reduction",
      "perplexity", "perplexity_se",   "delta_perplexity_pct", "kl_mean", "kl_se",    "top1_agreement", "top1_se",
      "needle_128", "full_needle_128", "calibration_s",        "eval_s"};
  ASSERT_EQ(rows.size(), 6u);  // the header, the full cache and 2 methods x 2 targets
  EXPECT_EQ(rows[0], header);
  std::map<std::string, size_t> column;
  for (size_t i = 0; i < header.size(); ++i) column[header[i]] = i;
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"full", "1"}, {"budget-l2", "0.5"}, {"budget-l2", "0.25"}, {"budget-attn", "0.5"}, {"budget-attn", "0.25"}};
  for (size_t r = 1; r < rows.size(); ++r) {
    const std::vector<std::string>& row = rows[r];
    ASSERT_EQ(row.size(), header.size()) << "row " << r;
    EXPECT_EQ(row[column["method"]], expected[r - 1].first);
    EXPECT_EQ(row[column["target"]], expected[r - 1].second);
    EXPECT_EQ(row[column["context"]], "128");
    EXPECT_GT(std::stod(row[column["perplexity"]]), 1.0);
    const double reduction = std::stod(row[column["kv_reduction"]]);
    if (r == 1) {
      EXPECT_EQ(reduction, 1.0);
      EXPECT_EQ(row[column["kl_mean"]], "");  // the full cache is not compared with itself
      EXPECT_EQ(row[column["needle_128"]], row[column["full_needle_128"]]);
    } else {
      EXPECT_GT(reduction, 1.0) << row[column["method"]];
      EXPECT_GE(std::stod(row[column["kl_mean"]]), 0.0);
      EXPECT_GE(std::stod(row[column["calibration_s"]]), 0.0);
      EXPECT_EQ(row[column["full_needle_128"]], rows[1][column["full_needle_128"]]);
    }
  }

  const std::string svg = ReadText(command.svg_path);
  EXPECT_EQ(XmlStructureError(svg), "");
  EXPECT_TRUE(IsSweepSvg(svg));
  EXPECT_EQ(Count(svg, "<polyline"), 4u);  // each method in each panel
  EXPECT_EQ(Count(svg, "<polyline data-method=\"budget-l2\""), 2u);
  EXPECT_EQ(Count(svg, "<circle"), 8u);
  for (const char* legend : {">budget-l2</text>", ">budget-attn</text>", ">full cache</text>"})
    EXPECT_EQ(Count(svg, legend), 1u) << legend;

  // The tables and plots a sweep writes are replaced by the next sweep without --force.
  EXPECT_TRUE(IsSweepCsv(ReadText(command.output_path)));
}

SweepPoint Point(const std::string& method, float target, int64_t kv_bytes, double perplexity, int correct) {
  return {.method = method,
          .target = target,
          .meets_target = target >= 0.1f,
          .kv_bytes = kv_bytes,
          .full_kv_bytes = 1 << 20,
          .perplexity = {.perplexity = perplexity, .standard_error = 0.5, .scored_tokens = 100},
          .divergence = DivergenceResult{.kl_mean = 0.01, .top1_agreement = 0.9},
          .needle = {{.context_length = 512, .correct = correct, .trials = 4, .reference_correct = 4},
                     {.context_length = 1024, .correct = 0, .trials = 4, .reference_correct = 3}},
          .calibration_seconds = 2,
          .eval_seconds = 3};
}

// Three methods, one of them beyond 32x and one better than the full cache.
SweepResult SyntheticResult() {
  SweepResult result = {.model_dir = "models/a<b>/", .device = "cpu", .context = 2048};
  result.full_cache = Point("full", 1, 1 << 20, 20.0, 4);
  result.full_cache.divergence.reset();
  result.full_cache.needle[1].correct = 3;
  result.points = {Point("budget-l2", 0.5f, 1 << 19, 21.0, 3), Point("budget-l2", 0.25f, 1 << 18, 24.0, 1),
                   Point("csr+budget", 0.25f, 1 << 18, 19.0, 4), Point("csr+budget", 0.01f, 1 << 14, 40.0, 0),
                   Point("share", 0.5f, 1 << 19, 22.0, 2)};
  return result;
}

TEST(SweepReportTest, TheTableHasAColumnPerMeasurementAndARowPerPoint) {
  const std::string csv = SweepCsv(SyntheticResult());
  EXPECT_TRUE(IsSweepCsv(csv));
  const std::vector<std::vector<std::string>> rows = CsvRows(csv);
  ASSERT_EQ(rows.size(), 7u);
  EXPECT_EQ(rows[0][14], "needle_512");
  EXPECT_EQ(rows[0][17], "full_needle_1024");
  EXPECT_EQ(rows[1],
            (std::vector<std::string>{"full", "1", "true", "2048", "1048576", "1048576", "1",    "20",   "0.5", "0",
                                      "",     "",  "",     "",     "1",       "1",       "0.75", "0.75", "2",   "3"}));
  EXPECT_EQ(rows[3], (std::vector<std::string>{"budget-l2", "0.25", "true", "2048", "262144", "1048576", "4",
                                               "24",        "0.5",  "20",   "0.01", "0",      "0.9",     "0",
                                               "0.25",      "1",    "0",    "0.75", "2",      "3"}));
  EXPECT_EQ(rows[5][2], "false");  // 0.01 missed
  EXPECT_EQ(rows[5][6], "64");
  EXPECT_EQ(rows[4][9], "-5");  // better than the full cache
}

TEST(SweepReportTest, ThePlotHasOneLinePerMethodInEachPanelAndALegend) {
  const std::string svg = SweepSvg(SyntheticResult());
  EXPECT_EQ(XmlStructureError(svg), "");
  EXPECT_TRUE(IsSweepSvg(svg));
  EXPECT_EQ(Count(svg, "<polyline"), 6u);
  for (const char* method : {"budget-l2", "csr+budget", "share"}) {
    EXPECT_EQ(Count(svg, absl::StrCat("<polyline data-method=\"", method, "\"")), 2u) << method;
    EXPECT_EQ(Count(svg, absl::StrCat(">", method, "</text>")), 1u) << method;
  }
  EXPECT_EQ(Count(svg, "<circle"), 10u);
  EXPECT_EQ(Count(svg, "class=\"full-cache\""), 2u);
  EXPECT_EQ(Count(svg, "stroke-dasharray"), 3u);  // the two full-cache lines and their legend entry
  // 64x is beyond the usual 1x..32x, so the axis reaches it; the title names the model, escaped.
  EXPECT_EQ(Count(svg, ">64x</text>"), 2u);
  EXPECT_EQ(Count(svg, ">1x</text>"), 2u);
  EXPECT_NE(svg.find("kvplan sweep: a&lt;b&gt;, 2048-token context, cpu"), std::string::npos);
  EXPECT_EQ(Count(svg, ">-20%</text>"), 1u);  // the perplexity axis reaches below zero (-5%), in steps of 20

  EXPECT_NE(SweepText(SyntheticResult()).find("(target missed)"), std::string::npos);
  EXPECT_FALSE(IsSweepSvg("<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>"));
  EXPECT_FALSE(IsSweepCsv("method,score\n"));
}

TEST(SweepTest, EveryPresetSetsItsCalibrationMethods) {
  std::set<std::string> names;
  for (const SweepMethod& method : SweepMethods()) {
    EXPECT_TRUE(names.insert(method.name).second) << "duplicate " << method.name;
    EXPECT_STRNE(method.description, "");
    CalibrateOptions options;
    options.methods.clear();
    method.configure(options);
    EXPECT_FALSE(options.methods.empty()) << method.name;
  }
  KVPLAN_ASSERT_OK_AND_ASSIGN(budget, FindSweepMethod("budget-attn"));
  CalibrateOptions options;
  budget.configure(options);
  EXPECT_EQ(options.methods, CalibrationMethods{CalibrationMethod::kBudget});
  EXPECT_EQ(options.budget_settings.policy.scoring, plan::TokenBudgets::ATTENTION_SCORE);
}

// The checkpoint is opened and the calibration data tokenized once for the whole grid, not once per point.
TEST(SweepTest, OneSessionServesEveryPoint) {
  SweepOptions options = TinySweep(TestFolder("session")).options;
  options.targets = {0.5f};
  std::vector<std::string> loads;
  KVPLAN_ASSERT_OK_AND_ASSIGN(result, Sweep(options, [&](const std::string& stage, int64_t done, int64_t) {
                                if (absl::StrContains(stage, "loading the model") && done == 0) loads.push_back(stage);
                              }));
  EXPECT_EQ(result.points.size(), 2u);
  EXPECT_EQ(loads, std::vector<std::string>{"calibration data: loading the model"});
}

TEST(SweepTest, BadInputIsRefusedNamingTheProblem) {
  SweepOptions options = TinySweep(TestFolder("bad")).options;
  options.methods = {"budget-l2", "quantum"};
  const absl::StatusOr<SweepResult> unknown = Sweep(options);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("unknown sweep method \"quantum\" (known: share, csr"), std::string::npos)
      << unknown.status();
  options.methods = {"budget-l2"};
  options.targets = {0.5f, 1.5f};
  EXPECT_EQ(Sweep(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.targets.clear();
  EXPECT_EQ(Sweep(options).status().code(), absl::StatusCode::kInvalidArgument);

  // An existing file that is not a sweep table is kept, and the check comes before any work.
  const std::string folder = TestFolder("existing");
  SweepCommand command = TinySweep(folder);
  std::ofstream(command.output_path) << "my notes\n";
  const absl::Status refused = RunSweep(command);
  EXPECT_EQ(refused.code(), absl::StatusCode::kAlreadyExists) << refused;
  EXPECT_EQ(ReadText(command.output_path), "my notes\n");
  command.options.perplexity.window = 4096;
  fs::remove(command.output_path);
  const absl::Status too_long = RunSweep(command);
  EXPECT_EQ(too_long.code(), absl::StatusCode::kOutOfRange) << too_long;
  EXPECT_FALSE(fs::exists(command.output_path));
}

// The error CLI11 reports for these sweep arguments, or "" when they parse.
std::string SweepParseError(std::vector<std::string> arguments) {
  const std::string model = testing::FixtureModelDir(), data = testing::SharedDir() + "/data/calib-sample.txt";
  arguments.insert(arguments.begin(),
                   {"sweep", "--model", model, "--calibration-data", data, "--eval-data", data, "-o", "results.csv"});
  return testing::CommandLineParseError(arguments);
}

TEST(SweepTest, TheCommandLineChecksMethodsAndTargets) {
  EXPECT_EQ(SweepParseError({"--methods", "budget-l2,csr+budget", "--targets", "0.5,0.2,0.1"}), "");
  EXPECT_NE(SweepParseError({"--methods", "budget-l2,quantum"}), "");
  EXPECT_EQ(SweepParseError({"--methods", ""}), "--methods: an empty value or list item");
  EXPECT_NE(SweepParseError({"--targets", "0.5,1.5"}), "");
  EXPECT_EQ(SweepParseError({"--targets", "0"}), "--targets: \"0\" is not a positive number");
  EXPECT_EQ(SweepParseError({"--targets", ""}), "--targets: an empty value or list item");
  EXPECT_NE(SweepParseError({"--needle-trials", "0"}), "");
}

}  // namespace
}  // namespace kvplan
