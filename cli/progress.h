// Progress of a long command on stderr: a one-line bar redrawn in place on a terminal; in a log or a pipe one line
// when a stage starts and one when it ends (no carriage returns in files); nothing with --quiet.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace kvplan {

enum class ProgressOutput { kBar, kLines, kNone };

inline ProgressOutput ProgressOutputFor(bool quiet) {
  if (quiet) return ProgressOutput::kNone;
  return isatty(STDERR_FILENO) ? ProgressOutput::kBar : ProgressOutput::kLines;
}

class ProgressBar {
 public:
  ProgressBar(std::string label, ProgressOutput output)
      : label_(std::move(label)), output_(output), start_(std::chrono::steady_clock::now()) {
    if (output_ == ProgressOutput::kLines) std::fprintf(stderr, "%s ...\n", label_.c_str());
  }
  void Update(int64_t done, int64_t total) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    switch (output_) {
      case ProgressOutput::kBar: DrawBar(done, total, elapsed); break;
      case ProgressOutput::kLines:
        if (done >= total && !finished_) std::fprintf(stderr, "%s done in %.1f s\n", label_.c_str(), elapsed);
        break;
      case ProgressOutput::kNone: break;
    }
    finished_ = done >= total;
  }

 private:
  void DrawBar(int64_t done, int64_t total, double elapsed) const {
    constexpr int kWidth = 30;
    const int filled = total > 0 ? int(kWidth * done / total) : kWidth;
    std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %.0fs", label_.c_str(), std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), (long long)done, (long long)total, elapsed);
    // The time left at the pace so far, once there is a pace.
    if (done > 0 && done < total) std::fprintf(stderr, ", ~%.0fs left  ", elapsed * double(total - done) / done);
    if (done >= total) std::fprintf(stderr, "            \n");
    std::fflush(stderr);
  }

  std::string label_;
  ProgressOutput output_;
  std::chrono::steady_clock::time_point start_;
  bool finished_ = false;
};

}  // namespace kvplan
