#include "base/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvplan {
namespace {

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(errno)));
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  // The process id keeps two writers' temporaries apart; the last rename wins, whole.
  const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
  const int fd = open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("create", temporary);
  absl::Status status;
  for (size_t written = 0; written < bytes.size() && status.ok();) {
    const ssize_t n = write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) status = ErrnoError("write", temporary);
    if (n > 0) written += size_t(n);
  }
  if (status.ok() && fsync(fd) != 0) status = ErrnoError("sync", temporary);
  if (close(fd) != 0 && status.ok()) status = ErrnoError("close", temporary);
  if (status.ok() && std::rename(temporary.c_str(), path.c_str()) != 0) status = ErrnoError("rename onto", path);
  if (!status.ok()) std::remove(temporary.c_str());
  return status;
}

}  // namespace kvplan
