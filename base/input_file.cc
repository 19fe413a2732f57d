#include "base/input_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvplan {

const char* FileKindName(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

absl::StatusOr<InputFile> InputFile::Open(const std::string& path, const char* what) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; the kind is checked before any read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", what, " ", path, ": ", std::strerror(errno)));
  InputFile file(fd, 0);
  struct stat info;
  if (::fstat(fd, &info) != 0)
    return absl::InternalError(absl::StrCat("cannot stat ", what, " ", path, ": ", std::strerror(errno)));
  if (!S_ISREG(info.st_mode))
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", what, " ", path, ": it is ", FileKindName(info.st_mode), ", not a regular file"));
  file.size_ = info.st_size;
  return file;
}

InputFile::InputFile(InputFile&& other) noexcept : fd_(std::exchange(other.fd_, -1)), size_(other.size_) {}

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::string> ReadInputFile(const std::string& path, const char* what, int64_t max_bytes) {
  absl::StatusOr<InputFile> file = InputFile::Open(path, what);
  if (!file.ok()) return file.status();
  if (file->size() > max_bytes)
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, " holds ", file->size(), " bytes; at most ", max_bytes, " are accepted"));
  std::string bytes(size_t(file->size()), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(file->descriptor(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("cannot read ", what, " ", path, ": ", std::strerror(errno)));
    if (n == 0) break;  // the file shrank while being read: what is there is what it holds now
    done += size_t(n);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace kvplan
