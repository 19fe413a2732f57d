#include "loader/documents.h"

#include <fstream>
#include <random>
#include <string>

#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

TEST(DocumentsTest, TextInAnyLanguageIsText) {
  EXPECT_EQ(NonTextFraction("plain ASCII\twith\r\ncontrols text uses\f\n"), 0.0);
  EXPECT_EQ(NonTextFraction("Grüße, naïve café, 日本語, emoji 😀"), 0.0);
  EXPECT_EQ(NonTextFraction(""), 0.0);
  // Latin-1 accents are invalid UTF-8, but few: such a file is still read.
  EXPECT_LT(NonTextFraction("Le caf\xe9 est tr\xe8s bon, et la cr\xe8me br\xfbl\xe9\x65 aussi, mais nous "
                            "pr\xe9\x66\xe9rons le th\xe9 le matin quand il fait froid dehors."),
            kMaxNonTextFraction);
}

TEST(DocumentsTest, InvalidSequencesAndControlBytesCount) {
  EXPECT_EQ(NonTextFraction("\xc0\xaf"), 1.0);      // an overlong '/'
  EXPECT_EQ(NonTextFraction("\xed\xa0\x80"), 1.0);  // a UTF-16 surrogate
  EXPECT_EQ(NonTextFraction("\xe6\x97"), 1.0);      // cut short
  EXPECT_EQ(NonTextFraction(std::string("a\0b\x1b", 4)), 0.5);
  EXPECT_EQ(NonTextFraction(std::string("h\0i\0", 4)), 0.5);  // UTF-16
}

TEST(DocumentsTest, RandomBytesAreRefusedNamingTheFileAndTheFraction) {
  const std::string path = ::testing::TempDir() + "/documents_test_random.txt";
  std::mt19937 generator(7);
  std::string bytes(100000, '\0');
  for (char& byte : bytes) byte = char(generator() & 0xff);
  std::ofstream(path, std::ios::binary) << bytes;
  const absl::StatusOr<std::string> text = ReadTextFile(path);
  ASSERT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(text.status().message());
  EXPECT_NE(message.find(path + " is not text: "), std::string::npos) << message;
  EXPECT_NE(message.find("% of its bytes are invalid UTF-8 or control characters"), std::string::npos) << message;
  EXPECT_GT(NonTextFraction(bytes), 0.4);
}

TEST(DocumentsTest, TheFixtureDataIsText) {
  for (const char* name : {"/data/calib-sample.txt", "/data/heldout-git-docs.txt"}) {
    const absl::StatusOr<std::string> text = ReadTextFile(testing::SharedDir() + name);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_LT(NonTextFraction(*text), 0.001) << name;
  }
}

}  // namespace
}  // namespace kvplan
