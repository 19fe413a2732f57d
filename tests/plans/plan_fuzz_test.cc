// Mutation fuzzing of plan files with the loader fuzzers' mutator, seeded from plans the planner compiles for
// the 6-layer fixture (every method). Half the mutants are re-sealed (length and checksum fixed) so the edited
// payload reaches the protobuf parser and the structural checks; a plan that parses must then give a cache
// policy and byte counts without crashing.
#include <cstring>

#include "base/hash.h"
#include "base/status_macros.h"
#include "loader/open_model.h"
#include "plans/cache_policy.h"
#include "plans/plan_io.h"
#include "tests/testing/mutation.h"
#include "tests/testing/plan_cases.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

constexpr size_t kHeaderBytes = 28;  // magic, format version, payload length, payload checksum
constexpr int kDefaultCases = 2000;

std::string Reseal(std::string file) {
  if (file.size() < kHeaderBytes) return file;
  const uint64_t length = file.size() - kHeaderBytes;
  const uint64_t checksum = Fnv1a64(file.data() + kHeaderBytes, length);
  std::memcpy(file.data() + 12, &length, 8);
  std::memcpy(file.data() + 20, &checksum, 8);
  return file;
}

TEST(PlanFuzzTest, PlanFiles) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  const plan::SparseCoding coding = testing::BasisCoding(loaded.config.num_layers, loaded.config.head_dim,
                                                         /*sparsity=*/4, /*recent_window=*/16);
  std::vector<std::string> seeds;
  for (const testing::PlanCase& plan_case :
       {testing::PlanCase{.name = "budgets", .budgets = true, .merge = true, .attention = true},
        testing::PlanCase{.name = "coding", .coding = true, .share = true},
        testing::PlanCase{.name = "refresh", .budgets = true, .refresh = true}})
    seeds.push_back(SerializePlanFile(testing::CompileTestPlan(plan_case, loaded, coding)));
  testing::Mutator mutator(/*random_seed=*/5, seeds);
  const testing::FuzzReport report = testing::RunFuzzCases(
      "plan file", mutator, testing::FuzzCaseCount(kDefaultCases),
      [&](const std::string& mutant, size_t) -> absl::Status {
        const bool resealed = mutator.Below(2) == 0;
        const absl::StatusOr<plan::Plan> parsed = ParsePlanFile(resealed ? Reseal(mutant) : mutant);
        if (!resealed && std::find(seeds.begin(), seeds.end(), mutant) == seeds.end()) {
          EXPECT_FALSE(parsed.ok()) << "an edit the checksum should have caught";
        }
        if (!parsed.ok()) return parsed.status();
        const CachePolicy policy = CachePolicyFromPlan(*parsed);
        for (int64_t length : {int64_t{1}, int64_t{4096}, int64_t{1} << 20}) CacheBytes(policy, length);
        return PoliciesFromPlan(*parsed, loaded.config, *loaded.weights).status();
      });
  EXPECT_GT(report.errors, 0);
}

}  // namespace
}  // namespace kvplan
