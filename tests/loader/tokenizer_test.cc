// Ids must equal those Hugging Face `tokenizers` produces (tests/data/tokenizer_expectations.json, written by
// tools/make_tokenizer_expectations.py) for the fixture's byte-level BPE and two SentencePiece-style
// byte-fallback tokenizers (Llama 2 normalizer layout and Metaspace pre-tokenizer layout).
#include "loader/tokenizer.h"

#include <fstream>
#include <sstream>

#include "loader/documents.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

nlohmann::json Expectations() {
  std::ifstream file(testing::TestDataDir() + "/tokenizer_expectations.json");
  std::stringstream text;
  text << file.rdbuf();
  return nlohmann::json::parse(text.str());
}

void CheckAgainstTransformers(const std::string& name, const std::string& tokenizer_path) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(tokenizer_path));
  const nlohmann::json cases = Expectations().at(name);
  ASSERT_GT(cases.size(), 10u);
  for (const auto& entry : cases) {
    const std::string text = entry.at("text").get<std::string>();
    const std::vector<int32_t> expected = entry.at("ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tokenizer->Encode(text);
    EXPECT_EQ(ids, expected) << name << ": " << text.substr(0, 80);
    EXPECT_EQ(tokenizer->Decode(ids), entry.at("decoded").get<std::string>()) << name << ": " << text.substr(0, 80);
  }
}

TEST(TokenizerTest, ByteLevelBpeMatchesTransformers) {
  CheckAgainstTransformers("llama-dev-6m", testing::FixtureModelDir() + "/tokenizer.json");
}

TEST(TokenizerTest, SentencePieceLlama2LayoutMatchesTransformers) {
  CheckAgainstTransformers("sp_llama2", testing::TestDataDir() + "/sp_llama2_tokenizer.json");
}

TEST(TokenizerTest, SentencePieceMetaspaceLayoutMatchesTransformers) {
  CheckAgainstTransformers("sp_metaspace", testing::TestDataDir() + "/sp_metaspace_tokenizer.json");
}

TEST(TokenizerTest, ByteLevelRoundTripsHeldOutDocuments) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(testing::FixtureModelDir() + "/tokenizer.json"));
  KVPLAN_ASSERT_OK_AND_ASSIGN(text, ReadTextFile(testing::SharedDir() + "/data/heldout-git-docs.txt"));
  const std::vector<std::string> documents = SplitDocuments(text);
  ASSERT_GT(documents.size(), 100u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(documents[i])), documents[i]);
  const std::string binary = std::string("\xff\xfe invalid \xc3 utf-8 \x80", 19);
  EXPECT_EQ(tokenizer->Decode(tokenizer->Encode(binary)), binary);
}

TEST(TokenizerTest, RecognisesSpecialTokensInText) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(tokenizer, Tokenizer::Load(testing::FixtureModelDir() + "/tokenizer.json"));
  const std::vector<int32_t> ids = tokenizer->Encode("<|begin_of_text|>hi<|end_of_text|>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(ids.back(), 1);
}

TEST(TokenizerTest, ClearErrorsForBadFiles) {
  EXPECT_EQ(Tokenizer::Load("/nonexistent/tokenizer.json").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(Tokenizer::FromJson("{").ok());
  const auto unigram = Tokenizer::FromJson(R"({"model": {"type": "Unigram", "vocab": []}})");
  ASSERT_FALSE(unigram.ok());
  EXPECT_NE(unigram.status().message().find("Unigram"), std::string::npos);
}

}  // namespace
}  // namespace kvplan
