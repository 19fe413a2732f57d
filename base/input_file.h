// Opening and reading input files, for every reader of kvplan (data, plans, model configs, tokenizers, checkpoints):
// only a regular file is accepted, so a device that never ends (/dev/zero) or a FIFO that never gets a writer is
// refused with its kind named instead of exhausting memory or blocking, and a file larger than the reader accepts is
// refused before it is read.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace kvplan {

// What a file that is not a regular one is ("a character device", "a FIFO", ...), for refusals that name it.
const char* FileKindName(mode_t mode);

// A regular file open for reading, closed with the object; `what` names it in errors ("data file", "plan", ...).
// Opening does not wait on a FIFO's writer.
class InputFile {
 public:
  static absl::StatusOr<InputFile> Open(const std::string& path, const char* what);
  InputFile(InputFile&& other) noexcept;
  InputFile& operator=(InputFile&&) = delete;
  InputFile(const InputFile&) = delete;
  ~InputFile();

  int descriptor() const { return fd_; }
  int64_t size() const { return size_; }

 private:
  InputFile(int fd, int64_t size) : fd_(fd), size_(size) {}
  int fd_;
  int64_t size_;
};

// The bytes of the regular file at `path` (InputFile); a file of more than max_bytes is refused.
absl::StatusOr<std::string> ReadInputFile(const std::string& path, const char* what,
                                          int64_t max_bytes = int64_t(16) << 30);

}  // namespace kvplan
