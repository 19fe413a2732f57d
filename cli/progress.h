// A one-line progress bar on stderr for long commands.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace kvplan {

class ProgressBar {
 public:
  explicit ProgressBar(std::string label) : label_(std::move(label)), start_(std::chrono::steady_clock::now()) {}
  void Update(int64_t done, int64_t total) {
    constexpr int kWidth = 30;
    const int filled = total > 0 ? int(kWidth * done / total) : kWidth;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %.0fs", label_.c_str(), std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), (long long)done, (long long)total, elapsed);
    // The time left at the pace so far, once there is a pace.
    if (done > 0 && done < total) std::fprintf(stderr, ", ~%.0fs left  ", elapsed * double(total - done) / done);
    if (done >= total) std::fprintf(stderr, "            \n");
    std::fflush(stderr);
  }

 private:
  std::string label_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace kvplan
