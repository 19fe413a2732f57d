// The C API driven as a C caller would on the 6-layer fixture: open, round-trip text, refuse bad plans naming the
// problem, decode greedily to the C++ runtime's very tokens (alone, in a batch and under a plan) and free every
// handle (the sanitizer tree runs this under ASan).
#include "capi/kvplan.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "eval/evaluate.h"
#include "loader/open_model.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "tests/testing/plan_cases.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;

struct Deleter {
  void operator()(kvplan_model* model) const { kvplan_model_free(model); }
  void operator()(kvplan_plan* plan) const { kvplan_plan_free(plan); }
  void operator()(kvplan_cache* cache) const { kvplan_cache_free(cache); }
  void operator()(kvplan_sampler* sampler) const { kvplan_sampler_free(sampler); }
};
template <typename Handle>
using Owned = std::unique_ptr<Handle, Deleter>;

std::string LastError() { return kvplan_last_error(); }

Owned<kvplan_model> OpenFixture() {
  kvplan_model* model = nullptr;
  EXPECT_EQ(kvplan_model_open(testing::FixtureModelDir().c_str(), &model), KVPLAN_OK) << LastError();
  return Owned<kvplan_model>(model);
}

std::vector<int32_t> Tokenize(const kvplan_model* model, const std::string& text) {
  size_t count = 0;
  EXPECT_EQ(kvplan_tokenize(model, text.c_str(), 1, nullptr, 0, &count), KVPLAN_OUT_OF_RANGE);
  std::vector<int32_t> tokens(count);
  EXPECT_EQ(kvplan_tokenize(model, text.c_str(), 1, tokens.data(), tokens.size(), &count), KVPLAN_OK) << LastError();
  return tokens;
}

// Greedy decoding of `prompts` side by side in one batch, as a serving loop would: prefill each, then one decode
// step for all sequences at a time.
std::vector<std::vector<int32_t>> GenerateThroughCApi(kvplan_cache* cache, const kvplan_model* model,
                                                      const std::vector<std::vector<int32_t>>& prompts, int tokens) {
  const int vocab = kvplan_model_vocab_size(model);
  kvplan_sampler* greedy = nullptr;
  EXPECT_EQ(kvplan_sampler_create(0.0f, 0, 1.0f, 0, &greedy), KVPLAN_OK) << LastError();
  Owned<kvplan_sampler> sampler(greedy);
  std::vector<std::vector<int32_t>> generated(prompts.size());
  std::vector<float> logits(prompts.size() * vocab);
  std::vector<int32_t> sequences, next(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) {
    EXPECT_EQ(kvplan_prefill(cache, int32_t(s), prompts[s].data(), prompts[s].size(), &logits[s * vocab]), KVPLAN_OK)
        << LastError();
    sequences.push_back(int32_t(s));
  }
  for (int step = 0; step < tokens; ++step) {
    for (size_t s = 0; s < prompts.size(); ++s) {
      EXPECT_EQ(kvplan_sample(sampler.get(), &logits[s * vocab], vocab, &next[s]), KVPLAN_OK) << LastError();
      generated[s].push_back(next[s]);
    }
    if (step + 1 < tokens) {
      EXPECT_EQ(kvplan_decode(cache, sequences.data(), next.data(), next.size(), logits.data()), KVPLAN_OK)
          << LastError();
    }
  }
  return generated;
}

// The fixture as the C++ runtime opens it, once for all tests.
const LoadedModel& RuntimeFixture() {
  static const LoadedModel loaded = [] {
    absl::StatusOr<LoadedModel> opened = OpenModel(testing::FixtureModelDir());
    if (!opened.ok()) {  // every test needs it
      std::fprintf(stderr, "%s\n", opened.status().ToString().c_str());
      std::abort();
    }
    return *std::move(opened);
  }();
  return loaded;
}

// The C++ runtime's greedy tokens for `prompt` (EOS ignored, as above).
std::vector<int32_t> GenerateThroughRuntime(const std::vector<int32_t>& prompt, int tokens,
                                            const plan::Plan* plan = nullptr) {
  const LoadedModel& loaded = RuntimeFixture();
  auto model = CreateModel(loaded.config, *loaded.weights,
                           {.backend = Backend::kCpu, .capacity = 512, .max_rows = 512, .plan = plan});
  EXPECT_TRUE(model.ok()) << model.status();
  auto generated = GenerateGreedy(**model, prompt, tokens, /*eos_token_id=*/-1);
  EXPECT_TRUE(generated.ok()) << generated.status();
  return *generated;
}

TEST(CApiTest, VersionsAndErrorsNameTheProblem) {
  EXPECT_EQ(kvplan_c_api_version(), KVPLAN_C_API_VERSION);
  EXPECT_STRNE(kvplan_version(), "");
  kvplan_model* model = nullptr;
  EXPECT_EQ(kvplan_model_open("/nonexistent/model", &model), KVPLAN_NOT_FOUND);
  EXPECT_EQ(model, nullptr);
  EXPECT_NE(LastError().find("kvplan_model_open: "), std::string::npos) << LastError();
  EXPECT_NE(LastError().find("/nonexistent/model"), std::string::npos) << LastError();
  EXPECT_EQ(kvplan_model_open(nullptr, &model), KVPLAN_INVALID_ARGUMENT);
  EXPECT_EQ(LastError(), "kvplan_model_open: model_dir is NULL");
  EXPECT_EQ(kvplan_prefill(nullptr, 0, nullptr, 0, nullptr), KVPLAN_INVALID_ARGUMENT);
  EXPECT_EQ(LastError(), "kvplan_prefill: cache is NULL");
  kvplan_sampler* sampler = nullptr;
  EXPECT_EQ(kvplan_sampler_create(-1.0f, 0, 1.0f, 0, &sampler), KVPLAN_INVALID_ARGUMENT);
  EXPECT_NE(LastError().find("temperature"), std::string::npos) << LastError();
  kvplan_model_free(nullptr);
  kvplan_plan_free(nullptr);
  kvplan_cache_free(nullptr);
  kvplan_sampler_free(nullptr);
}

TEST(CApiTest, TextRoundTripsThroughTheTokenizer) {
  Owned<kvplan_model> model = OpenFixture();
  ASSERT_NE(model, nullptr);
  const std::string text = "git-show(1): show various types of objects";
  const std::vector<int32_t> tokens = Tokenize(model.get(), text);
  ASSERT_GT(tokens.size(), 1u);
  EXPECT_EQ(tokens[0], kvplan_model_bos_token(model.get()));
  size_t length = 0;
  EXPECT_EQ(kvplan_detokenize(model.get(), tokens.data() + 1, tokens.size() - 1, nullptr, 0, &length),
            KVPLAN_OUT_OF_RANGE);
  ASSERT_EQ(length, text.size());
  std::string decoded(length + 1, '\0');
  EXPECT_EQ(
      kvplan_detokenize(model.get(), tokens.data() + 1, tokens.size() - 1, decoded.data(), decoded.size(), &length),
      KVPLAN_OK)
      << LastError();
  EXPECT_EQ(decoded.c_str(), text);
  const int32_t outside = kvplan_model_vocab_size(model.get());
  EXPECT_EQ(kvplan_detokenize(model.get(), &outside, 1, decoded.data(), decoded.size(), &length),
            KVPLAN_INVALID_ARGUMENT);
  EXPECT_NE(LastError().find("outside the vocabulary"), std::string::npos) << LastError();
}

TEST(CApiTest, GreedyDecodingMatchesTheRuntimeAloneAndInABatch) {
  Owned<kvplan_model> model = OpenFixture();
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> first = Tokenize(model.get(), "git-show(1)"),
                             second = Tokenize(model.get(), "NAME\n       git-log - Show commit logs");
  constexpr int kTokens = 8;
  kvplan_cache* created = nullptr;
  ASSERT_EQ(kvplan_cache_create(model.get(), nullptr, 2, 256, KVPLAN_DEVICE_CPU, &created), KVPLAN_OK) << LastError();
  Owned<kvplan_cache> cache(created);
  EXPECT_STREQ(kvplan_cache_device_name(cache.get()), "cpu");
  kvplan_cache* refused = nullptr;
  EXPECT_EQ(kvplan_cache_create(model.get(), nullptr, 1, 4096, KVPLAN_DEVICE_CPU, &refused), KVPLAN_OUT_OF_RANGE);
  EXPECT_EQ(LastError(), "kvplan_cache_create: capacity 4096 exceeds the model's max_position_embeddings of 2048");
  EXPECT_EQ(kvplan_cache_create(model.get(), nullptr, 1, 64, 7, &refused), KVPLAN_INVALID_ARGUMENT);
  EXPECT_EQ(refused, nullptr);
  const std::vector<std::vector<int32_t>> generated =
      GenerateThroughCApi(cache.get(), model.get(), {first, second}, kTokens);
  EXPECT_EQ(generated[0], GenerateThroughRuntime(first, kTokens));
  EXPECT_EQ(generated[1], GenerateThroughRuntime(second, kTokens));
  EXPECT_EQ(kvplan_cache_sequence_length(cache.get(), 1), int32_t(second.size()) + kTokens - 1);
  EXPECT_GT(kvplan_cache_bytes(cache.get()), 0);

  // Past the capacity, and a sequence twice in one step, are refused and leave the cache as it was.
  const std::vector<int32_t> long_prompt(256, first[1]);
  EXPECT_EQ(kvplan_prefill(cache.get(), 0, long_prompt.data(), long_prompt.size(), nullptr), KVPLAN_OUT_OF_RANGE);
  EXPECT_NE(LastError().find("capacity of 256"), std::string::npos) << LastError();
  const int32_t twice[] = {1, 1}, tokens[] = {5, 6};
  EXPECT_EQ(kvplan_decode(cache.get(), twice, tokens, 2, nullptr), KVPLAN_INVALID_ARGUMENT);
  EXPECT_EQ(kvplan_cache_sequence_length(cache.get(), 1), int32_t(second.size()) + kTokens - 1);
  EXPECT_EQ(kvplan_decode(cache.get(), twice, tokens, 1, nullptr), KVPLAN_OK);
  const int32_t outside = 2;
  EXPECT_EQ(kvplan_decode(cache.get(), &outside, tokens, 1, nullptr), KVPLAN_OUT_OF_RANGE);

  // A sequence given to a new request starts over while the other keeps its cache.
  ASSERT_EQ(kvplan_cache_reset_sequence(cache.get(), 0), KVPLAN_OK) << LastError();
  EXPECT_EQ(kvplan_cache_sequence_length(cache.get(), 0), 0);
  EXPECT_EQ(kvplan_cache_sequence_length(cache.get(), 1), int32_t(second.size()) + kTokens);
  EXPECT_EQ(GenerateThroughCApi(cache.get(), model.get(), {first}, kTokens)[0], generated[0]);
  EXPECT_EQ(kvplan_cache_reset_sequence(cache.get(), 2), KVPLAN_OUT_OF_RANGE);
  kvplan_cache_reset(cache.get());
  EXPECT_EQ(kvplan_cache_sequence_length(cache.get(), 1), 0);
}

TEST(CApiTest, PlansAreCheckedAgainstTheModelAndExecuted) {
  Owned<kvplan_model> model = OpenFixture();
  ASSERT_NE(model, nullptr);
  const plan::Plan budgets = testing::CompileTestPlan({.name = "budgets", .budgets = true}, RuntimeFixture(), {});
  const fs::path folder = fs::path(::testing::TempDir()) / "capi_test";
  fs::create_directories(folder);
  const std::string good = (folder / "budgets.kvplan").string(), other = (folder / "other.kvplan").string(),
                    truncated = (folder / "truncated.kvplan").string();
  ASSERT_TRUE(WritePlanFile(budgets, good).ok());
  plan::Plan for_another_model = budgets;
  for_another_model.mutable_model()->set_num_layers(32);
  ASSERT_TRUE(WritePlanFile(for_another_model, other).ok());
  const std::string bytes = SerializePlanFile(budgets);
  std::ofstream(truncated, std::ios::binary) << bytes.substr(0, bytes.size() / 2);

  kvplan_plan* plan = nullptr;
  EXPECT_EQ(kvplan_plan_open(model.get(), other.c_str(), &plan), KVPLAN_FAILED_PRECONDITION);
  EXPECT_EQ(plan, nullptr);
  EXPECT_NE(LastError().find("plan was calibrated for another model: layers 32 in the plan, 6 in the model"),
            std::string::npos)
      << LastError();
  EXPECT_EQ(kvplan_plan_open(model.get(), truncated.c_str(), &plan), KVPLAN_DATA_LOSS) << LastError();
  EXPECT_EQ(kvplan_plan_open(model.get(), (folder / "missing.kvplan").c_str(), &plan), KVPLAN_NOT_FOUND);

  ASSERT_EQ(kvplan_plan_open(model.get(), good.c_str(), &plan), KVPLAN_OK) << LastError();
  Owned<kvplan_plan> opened(plan);
  kvplan_cache* created = nullptr;
  ASSERT_EQ(kvplan_cache_create(model.get(), opened.get(), 1, 512, KVPLAN_DEVICE_CPU, &created), KVPLAN_OK)
      << LastError();
  Owned<kvplan_cache> cache(created);
  opened.reset();  // the cache keeps what it needs of the plan
  std::ifstream data(testing::SharedDir() + "/data/heldout-git-docs.txt");
  std::string text(1500, '\0');
  data.read(text.data(), std::streamsize(text.size()));
  const std::vector<int32_t> prompt = Tokenize(model.get(), text);
  ASSERT_LT(prompt.size() + 8, 512u);
  EXPECT_EQ(GenerateThroughCApi(cache.get(), model.get(), {prompt}, 8)[0], GenerateThroughRuntime(prompt, 8, &budgets));
}

}  // namespace
}  // namespace kvplan
