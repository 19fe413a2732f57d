#include "base/input_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

absl::StatusOr<std::string> ReadInputFile(const std::string& path, const char* what, int64_t max_bytes) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; the kind is checked before any read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", what, " ", path, ": ", std::strerror(errno)));
  struct FileCloser {
    int fd;
    ~FileCloser() { ::close(fd); }
  } closer{fd};
  struct stat info;
  if (::fstat(fd, &info) != 0)
    return absl::InternalError(absl::StrCat("cannot stat ", what, " ", path, ": ", std::strerror(errno)));
  if (!S_ISREG(info.st_mode))
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", what, " ", path, ": it is ", FileKindName(info.st_mode), ", not a regular file"));
  if (info.st_size > max_bytes)
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " holds ", info.st_size, " bytes; at most ",
                                                   max_bytes, " are accepted"));
  std::string bytes(size_t(info.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("cannot read ", what, " ", path, ": ", std::strerror(errno)));
    if (n == 0) break;  // the file shrank while being read: what is there is what it holds now
    done += size_t(n);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace kvplan
