// Mutation fuzzing of everything a user's model directory feeds the loader: safetensors headers, the sharded
// index, config.json and tokenizer.json, seeded from the fixture models and tests/loader/data. Every case must
// end in an error Status or a valid load that can then be used; nothing may crash, hang or allocate more than
// the input justifies. KVPLAN_FUZZ_CASES runs more cases per parser.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "loader/model_config.h"
#include "loader/safetensors.h"
#include "loader/tokenizer.h"
#include "tests/testing/mutation.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

namespace fs = std::filesystem;
using testing::FuzzCaseCount;
using testing::FuzzReport;
using testing::Mutator;
using testing::RunFuzzCases;

constexpr int kDefaultCases = 2000;

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A fresh folder per test and process (tests and build trees run in parallel), removed when the test ends.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name)
      : path_(fs::path(::testing::TempDir()) / absl::StrCat("kvplan_fuzz_", name, "_", getpid())) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string path() const { return path_.string(); }
  std::string File(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string Model(const std::string& name) { return testing::SharedDir() + "/models/" + name; }

// The 8-byte length and the JSON header of a safetensors file; its tensor data is the rest.
struct SafetensorsSeed {
  std::string prefix;
  uint64_t data_bytes;
};

SafetensorsSeed ReadSafetensorsPrefix(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  uint64_t header_bytes = 0;
  file.read(reinterpret_cast<char*>(&header_bytes), 8);
  std::string prefix(8 + header_bytes, '\0');
  file.seekg(0);
  file.read(prefix.data(), std::streamsize(prefix.size()));
  return {prefix, fs::file_size(path) - prefix.size()};
}

// A valid load must also read: every small tensor is converted (the large ones only add time).
absl::Status ReadSmallTensors(const Checkpoint& checkpoint) {
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    if (tensor.bytes > (1 << 16)) continue;
    const absl::Status status = tensor.dtype == DType::kI32 ? checkpoint.ReadInt32(name).status()
                                                            : checkpoint.ReadFloat(name, tensor.shape).status();
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

TEST(LoaderFuzzTest, SafetensorsHeaders) {
  std::vector<SafetensorsSeed> seeds = {ReadSafetensorsPrefix(Model("llama-dev-6m") + "/model.safetensors"),
                                        ReadSafetensorsPrefix(Model("llama-dev-6m") + "/reference.safetensors")};
  for (int shard = 1; shard <= 3; ++shard)
    seeds.push_back(
        ReadSafetensorsPrefix(absl::StrCat(Model("llama-dev-16l"), "/model-0000", shard, "-of-00003.safetensors")));
  std::vector<std::string> prefixes;
  for (const SafetensorsSeed& seed : seeds) prefixes.push_back(seed.prefix);
  Mutator mutator(/*random_seed=*/1, prefixes);
  const ScratchDir dir("safetensors");
  const std::string path = dir.File("model.safetensors");
  const FuzzReport report =
      RunFuzzCases("safetensors header", mutator, FuzzCaseCount(kDefaultCases),
                   [&](std::string mutant, size_t seed) -> absl::Status {
                     // Half the cases fix the length field to the mutated header, so the JSON itself reaches the
                     // parser.
                     if (mutator.Below(2) == 0 && mutant.size() >= 8) {
                       const uint64_t header_bytes = mutant.size() - 8;
                       std::memcpy(mutant.data(), &header_bytes, 8);
                     }
                     WriteFile(path, mutant);
                     // The data as a hole: as long as the original, so intact offsets still fit, at no cost.
                     fs::resize_file(path, mutant.size() + seeds[seed].data_bytes);
                     KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::OpenFile(path));
                     return ReadSmallTensors(*checkpoint);
                   });
  EXPECT_GT(report.loads, 0);
  EXPECT_GT(report.errors, 0);
}

TEST(LoaderFuzzTest, ShardedIndex) {
  const ScratchDir dir("index");
  for (int shard = 1; shard <= 3; ++shard) {
    const std::string name = absl::StrCat("model-0000", shard, "-of-00003.safetensors");
    fs::create_symlink(Model("llama-dev-16l") + "/" + name, dir.File(name));
  }
  const std::string index = ReadFile(Model("llama-dev-16l") + "/model.safetensors.index.json");
  WriteFile(dir.File("model.safetensors.index.json"), index);
  ASSERT_TRUE(Checkpoint::Open(dir.path()).ok());
  // Nearly every edit lands in a tensor or shard name, so valid loads are rare here.
  Mutator mutator(/*random_seed=*/2, {index});
  RunFuzzCases("sharded index", mutator, FuzzCaseCount(kDefaultCases),
               [&](const std::string& mutant, size_t) -> absl::Status {
                 WriteFile(dir.File("model.safetensors.index.json"), mutant);
                 return Checkpoint::Open(dir.path()).status();
               });
}

TEST(LoaderFuzzTest, ModelConfig) {
  Mutator mutator(/*random_seed=*/3, {ReadFile(Model("llama-dev-6m") + "/config.json"),
                                      ReadFile(Model("llama-dev-16l") + "/config.json")});
  const FuzzReport report = RunFuzzCases(
      "config.json", mutator, FuzzCaseCount(kDefaultCases), [](const std::string& mutant, size_t) -> absl::Status {
        KVPLAN_ASSIGN_OR_RETURN(const ModelConfig config, ParseModelConfig(mutant));
        // What every runtime computes from a config before it reads a weight.
        EXPECT_GT(config.parameter_count(), 0);
        EXPECT_EQ(RopeInverseFrequencies(config).size(), size_t(config.head_dim / 2));
        return absl::OkStatus();
      });
  EXPECT_GT(report.loads, 0);
}

TEST(LoaderFuzzTest, Tokenizer) {
  Mutator mutator(/*random_seed=*/4, {ReadFile(Model("llama-dev-6m") + "/tokenizer.json"),
                                      ReadFile(testing::TestDataDir() + "/sp_llama2_tokenizer.json"),
                                      ReadFile(testing::TestDataDir() + "/sp_metaspace_tokenizer.json")});
  const FuzzReport report = RunFuzzCases(
      "tokenizer.json", mutator, FuzzCaseCount(kDefaultCases), [](const std::string& mutant, size_t) -> absl::Status {
        KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromJson(mutant));
        const std::vector<int32_t> ids = tokenizer->Encode("Hello <|begin_of_text|> wörld\n\t 12345 <0x41> \xff!");
        tokenizer->Decode(ids);
        std::vector<int32_t> every_id(tokenizer->vocab_size());
        for (int32_t id = 0; id < tokenizer->vocab_size(); ++id) every_id[id] = id;
        tokenizer->Decode(every_id);
        return absl::OkStatus();
      });
  EXPECT_GT(report.loads, 0);
}

// The fuzz cases reach these only by chance; each JSON reader must refuse them every time.
TEST(LoaderFuzzTest, DeepNestingIsRefusedByEveryJsonReader) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_FALSE(ParseModelConfig(deep).ok());
  EXPECT_FALSE(ParseModelConfig(R"({"architectures": )" + deep + "}").ok());
  EXPECT_FALSE(Tokenizer::FromJson(R"({"model": {"type": "BPE", "vocab": )" + deep + "}}").ok());
  EXPECT_FALSE(Tokenizer::FromJson(R"({"pre_tokenizer": )" + deep + "}").ok());
  const ScratchDir dir("deep");
  WriteFile(dir.File("model.safetensors.index.json"), R"({"weight_map": )" + deep + "}");
  EXPECT_FALSE(Checkpoint::Open(dir.path()).ok());
  const std::string header = R"({"a": )" + deep + "}";
  const uint64_t header_bytes = header.size();
  std::string file(reinterpret_cast<const char*>(&header_bytes), 8);
  WriteFile(dir.File("single.safetensors"), file + header);
  EXPECT_FALSE(Checkpoint::OpenFile(dir.File("single.safetensors")).ok());
}

TEST(LoaderFuzzTest, HeaderClaimingTerabytesIsRefusedWithoutAllocating) {
  const ScratchDir dir("terabytes");
  auto open_with_header = [&](uint64_t header_bytes, const std::string& header) {
    std::string file(reinterpret_cast<const char*>(&header_bytes), 8);
    WriteFile(dir.File("model.safetensors"), file + header);
    return Checkpoint::OpenFile(dir.File("model.safetensors")).status();
  };
  EXPECT_FALSE(open_with_header(uint64_t{1} << 40, "{}").ok());
  EXPECT_FALSE(open_with_header(~uint64_t{0}, "{}").ok());
  const std::string huge_tensor =
      R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 0]}})";
  EXPECT_FALSE(open_with_header(huge_tensor.size(), huge_tensor).ok());
  const std::string overflowing_tensor =
      R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})";
  EXPECT_FALSE(open_with_header(overflowing_tensor.size(), overflowing_tensor).ok());
  const std::string far_offsets =
      R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [1099511627776, 1099511627780]}})";
  EXPECT_FALSE(open_with_header(far_offsets.size(), far_offsets).ok());
}

}  // namespace
}  // namespace kvplan
