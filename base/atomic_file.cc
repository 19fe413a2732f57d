#include "base/atomic_file.h"

#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvplan {
namespace {

// The temporary a write in progress is filling. A signal handler may read it at any moment, so it is a fixed
// buffer published through a lock-free flag, never a std::string.
char temporary_in_progress[PATH_MAX];
std::atomic<bool> writing{false};
static_assert(std::atomic<bool>::is_always_lock_free);

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(errno)));
}

// Writes `bytes` to `temporary`, syncs it and renames it onto `path`; removes the temporary on failure.
absl::Status WriteAndRename(const std::string& temporary, const std::string& path, std::string_view bytes) {
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

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  // The process id keeps two writers' temporaries apart; the last rename wins, whole.
  const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
  if (temporary.size() >= sizeof(temporary_in_progress))
    return absl::InvalidArgumentError(absl::StrCat("path too long: ", path));
  std::memcpy(temporary_in_progress, temporary.c_str(), temporary.size() + 1);
  writing.store(true);
  const absl::Status status = WriteAndRename(temporary, path, bytes);
  writing.store(false);
  return status;
}

void RemoveTemporaryFileInProgress() {
  if (writing.load()) unlink(temporary_in_progress);
}

}  // namespace kvplan
