// The fuzz tests' shared, deterministic mutator. Each parser is fed mutants of real files: random byte edits
// (bit flips, inserts, deletes, truncation, splices from other seeds) plus the edits that break parsers in
// practice — numbers blown up to 1e308, 2^64 or negative sizes, binary length fields set to terabytes, and JSON
// nested 100k deep. A test states what a case must end in (an error Status or a valid load); FuzzCaseCount and
// PeakResidentBytes bound how long it runs and how much memory a case may take.
#pragma once

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace kvplan::testing {

// Cases per fuzz test: the test's default keeps ctest short; KVPLAN_FUZZ_CASES asks for a longer run.
inline int FuzzCaseCount(int default_count) {
  const char* requested = std::getenv("KVPLAN_FUZZ_CASES");
  return requested != nullptr && std::atoi(requested) > 0 ? std::atoi(requested) : default_count;
}

// The process's peak resident set so far. It only grows, so a case that allocated and freed a huge buffer
// still shows.
inline int64_t PeakResidentBytes() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return int64_t(usage.ru_maxrss) * 1024;
}

class Mutator {
 public:
  // Splices take their bytes from any of `seeds`.
  Mutator(uint64_t random_seed, std::vector<std::string> seeds) : generator_(random_seed), seeds_(std::move(seeds)) {}

  // Uniform in [0, bound): tests draw their own per-case choices from the same deterministic stream.
  size_t Below(size_t bound) { return bound == 0 ? 0 : generator_() % bound; }

  // A mutant of a random seed, and which seed it came from.
  std::pair<std::string, size_t> MutateSomeSeed() {
    const size_t seed = Below(seeds_.size());
    return {Mutate(seeds_[seed]), seed};
  }

  // Half the mutants keep JSON seeds valid JSON (only values change), so they get past the syntax check and
  // reach the checks of sizes, types and ids; the other half edit bytes anywhere.
  std::string Mutate(std::string input) {
    const bool keep_syntax = Below(2) == 0;
    const size_t edits = 1 + Below(3);
    for (size_t e = 0; e < edits; ++e) keep_syntax ? ReplaceJsonValue(input, Below(input.size() + 1)) : Edit(input);
    if (input.size() > kMaxInputBytes) input.resize(kMaxInputBytes);
    return input;
  }

 private:
  static constexpr size_t kMaxInputBytes = 4 << 20;

  void Edit(std::string& input) {
    const size_t at = Below(input.size() + 1);
    switch (Below(11)) {
      case 0:
        if (!input.empty()) input[at % input.size()] ^= char(1 << Below(8));
        break;
      case 1: input.insert(at, RandomBytes(1 + Below(8))); break;
      case 2: input.erase(at, 1 + Below(64)); break;
      case 3: input.resize(at); break;
      case 4: Splice(input, at); break;
      case 5:
      case 6: BlowUpNumber(input, at); break;
      case 7: OverwriteBinaryInteger(input, at); break;
      case 8: input.insert(at, Nesting(/*closed=*/Below(2) == 0)); break;
      case 9: input.insert(at, JsonFragment()); break;
      default: ReplaceJsonValue(input, at); break;
    }
  }

  std::string RandomBytes(size_t count) {
    std::string bytes(count, '\0');
    for (char& byte : bytes) byte = char(generator_());
    return bytes;
  }

  // A slice of another seed, inserted or written over this one's bytes.
  void Splice(std::string& input, size_t at) {
    const std::string& donor = seeds_[Below(seeds_.size())];
    const size_t begin = Below(donor.size());
    const std::string slice = donor.substr(begin, 1 + Below(std::min<size_t>(donor.size() - begin, 512)));
    if (Below(2) == 0) {
      input.insert(at, slice);
    } else {
      input.replace(at, slice.size(), slice);
    }
  }

  // The JSON value after the first ':', ',' or '[' at or after `at` becomes an extreme number, another type,
  // deep nesting or a value found elsewhere in the seeds.
  void ReplaceJsonValue(std::string& input, size_t at) {
    const auto [begin, end] = JsonValueAfter(input, at);
    if (begin == end) return;
    std::string replacement;
    switch (Below(4)) {
      case 0: replacement = ExtremeNumber(); break;
      case 1: replacement = Nesting(/*closed=*/true); break;
      case 2: replacement = JsonFragment(); break;
      default: {
        const std::string& donor = seeds_[Below(seeds_.size())];
        const auto [donor_begin, donor_end] = JsonValueAfter(donor, Below(donor.size()));
        replacement = donor.substr(donor_begin, donor_end - donor_begin);
      }
    }
    input.replace(begin, end - begin, replacement);
  }

  // [begin, end) of the JSON value after the first ':', ',' or '[' at or after `at` (skipping an object's key);
  // empty when there is none. A scan that knows strings and brackets, not a parser.
  static std::pair<size_t, size_t> JsonValueAfter(const std::string& text, size_t at) {
    const size_t separator = text.find_first_of(":,[", at);
    if (separator == std::string::npos) return {0, 0};
    size_t begin = text.find_first_not_of(" \t\r\n", separator + 1);
    if (begin == std::string::npos) return {0, 0};
    size_t end = JsonValueEnd(text, begin);
    if (const size_t next = text.find_first_not_of(" \t\r\n", end); next != std::string::npos && text[next] == ':') {
      begin = text.find_first_not_of(" \t\r\n", next + 1);
      if (begin == std::string::npos) return {0, 0};
      end = JsonValueEnd(text, begin);
    }
    return {begin, end};
  }

  static size_t JsonValueEnd(const std::string& text, size_t begin) {
    int depth = 0;
    bool in_string = false;
    for (size_t i = begin; i < text.size(); ++i) {
      const char c = text[i];
      if (in_string) {
        if (c == '\\') {
          ++i;
        } else if (c == '"') {
          in_string = false;
          if (depth == 0) return i + 1;
        }
      } else if (c == '"') {
        in_string = true;
      } else if (c == '[' || c == '{') {
        ++depth;
      } else if (c == ']' || c == '}') {
        if (depth == 0) return i;
        if (--depth == 0) return i + 1;
      } else if (depth == 0 && c == ',') {
        return i;
      }
    }
    return text.size();
  }

  // The textual number at or after `at` (or a new one there) becomes one that overflows whatever reads it.
  void BlowUpNumber(std::string& input, size_t at) {
    const std::string number = ExtremeNumber();
    const size_t begin = input.find_first_of("-0123456789", at);
    if (begin == std::string::npos) {
      input.insert(at, number);
      return;
    }
    const size_t end = std::min(input.find_first_not_of("-+.eE0123456789", begin + 1), input.size());
    input.replace(begin, end - begin, number);
  }

  std::string ExtremeNumber() {
    static const char* kNumbers[] = {"1e308",
                                     "-1e308",
                                     "1e999",
                                     "18446744073709551616",
                                     "18446744073709551615",
                                     "9223372036854775807",
                                     "-9223372036854775808",
                                     "4294967296",
                                     "2147483648",
                                     "-2147483649",
                                     "-1",
                                     "0",
                                     "1099511627776",
                                     "0.5",
                                     "-0"};
    return kNumbers[Below(std::size(kNumbers))];
  }

  // Binary formats keep lengths and offsets as little-endian integers: write an extreme one at `at`.
  void OverwriteBinaryInteger(std::string& input, size_t at) {
    static const uint64_t kValues[] = {~uint64_t{0}, uint64_t{1} << 40, uint64_t{1} << 63, 0xffffffff, 0x80000000, 0};
    const uint64_t value = kValues[Below(std::size(kValues))];
    const size_t width = Below(2) == 0 ? 8 : 4;
    // Length fields mostly sit at the start of a file.
    if (Below(2) == 0) at = 0;
    if (at + width > input.size()) return;
    std::memcpy(input.data() + at, &value, width);
  }

  // Arrays or objects nested around each other; `closed` makes it one valid JSON value.
  std::string Nesting(bool closed) {
    static const size_t kDepths[] = {64, 129, 1000, 100000};
    const size_t depth = kDepths[Below(std::size(kDepths))];
    const bool object = Below(2) == 0;
    std::string nesting;
    nesting.reserve(depth * 6);
    for (size_t level = 0; level < depth; ++level) nesting += object ? "{\"a\":" : "[";
    if (!closed) return nesting;
    return nesting + (object ? "0" : "") + std::string(depth, object ? '}' : ']');
  }

  std::string JsonFragment() {
    static const char* kFragments[] = {
        "null",        "{}",       "[]", "\"", "\\u0000", "true", ",", ":", "\"\"", "[1]", "{\"type\":\"Sequence\"}",
        "\"\\ud800\"", "\xff\xfe", "-"};
    return kFragments[Below(std::size(kFragments))];
  }

  std::mt19937_64 generator_;
  std::vector<std::string> seeds_;
};

struct FuzzReport {
  int cases = 0;
  int errors = 0;  // ended in an error Status
  int loads = 0;   // loaded (and survived whatever the test does with a valid load)
  int64_t peak_growth_bytes = 0;
  double slowest_case_seconds = 0;
};

// Feeds `cases` mutants to `load`, which returns the load's Status, and fails the test when a case's memory
// outgrows its input (a header claiming terabytes must be refused, not allocated) or when a case runs long
// (quadratic or worse). Crashes, sanitizer reports and hangs end the process, and with it the test. `name`
// labels the summary line that tests/README.md's table is made from.
template <typename Load>
FuzzReport RunFuzzCases(const char* name, Mutator& mutator, int cases, Load load) {
  // Allocator caches and ASan's quarantine (256 MiB) grow with the run whatever the parser does.
  constexpr int64_t kAllocatorSlackBytes = int64_t{512} << 20;
  constexpr int64_t kBytesPerInputByte = 64;
  constexpr double kSlowCaseSeconds = 10;
  const int64_t baseline = PeakResidentBytes();
  int64_t largest_input = 0;
  FuzzReport report;
  for (int index = 0; index < cases; ++index) {
    const auto [mutant, seed] = mutator.MutateSomeSeed();
    largest_input = std::max<int64_t>(largest_input, int64_t(mutant.size()));
    const auto start = std::chrono::steady_clock::now();
    const absl::Status status = load(mutant, seed);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++report.cases;
    ++(status.ok() ? report.loads : report.errors);
    report.slowest_case_seconds = std::max(report.slowest_case_seconds, seconds);
    EXPECT_LT(seconds, kSlowCaseSeconds) << name << " case " << index << " (from seed " << seed << ")";
    report.peak_growth_bytes = PeakResidentBytes() - baseline;
    if (report.peak_growth_bytes > kAllocatorSlackBytes + kBytesPerInputByte * largest_input) {
      ADD_FAILURE() << name << " case " << index << " (from seed " << seed << ", " << mutant.size()
                    << " bytes) raised the peak resident set by " << report.peak_growth_bytes << " bytes";
      break;
    }
  }
  std::printf("fuzz %s: %d cases, %d errors, %d valid loads, peak RSS +%lld MiB, slowest case %.3f s\n", name,
              report.cases, report.errors, report.loads, static_cast<long long>(report.peak_growth_bytes >> 20),
              report.slowest_case_seconds);
  ::testing::Test::RecordProperty("fuzz_cases", report.cases);
  ::testing::Test::RecordProperty("fuzz_errors", report.errors);
  ::testing::Test::RecordProperty("fuzz_loads", report.loads);
  return report;
}

}  // namespace kvplan::testing
