#include "cli/interruption.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "base/atomic_file.h"

namespace kvplan {
namespace {

// The handler may run while the message is being replaced, so there are two: one being written, the other
// complete, chosen by a lock-free index.
constexpr size_t kMessageBytes = 512;
char messages[2][kMessageBytes];
std::atomic<int> current_message{0};
static_assert(std::atomic<int>::is_always_lock_free);

// Only async-signal-safe calls: unlink (through RemoveTemporaryFileInProgress), strlen, write, _exit.
void ExitInterrupted(int signal) {
  RemoveTemporaryFileInProgress();
  const char* message = messages[current_message.load()];
  ssize_t ignored = write(STDERR_FILENO, message, std::strlen(message));
  (void)ignored;
  _exit(128 + signal);
}

}  // namespace

void SetInterruptedActivity(std::string_view activity) {
  constexpr std::string_view kPrefix = "\ninterrupted during ";
  const int next = 1 - current_message.load();
  char* message = messages[next];
  const size_t length = std::min(activity.size(), kMessageBytes - kPrefix.size() - 2);
  std::memcpy(message, kPrefix.data(), kPrefix.size());
  std::memcpy(message + kPrefix.size(), activity.data(), length);
  std::memcpy(message + kPrefix.size() + length, "\n", 2);
  current_message.store(next);
}

void ExitOnInterruption() {
  SetInterruptedActivity("kvplan");
  struct sigaction action = {};
  action.sa_handler = ExitInterrupted;
  sigemptyset(&action.sa_mask);
  for (int signal : {SIGINT, SIGTERM}) sigaddset(&action.sa_mask, signal);  // one handler runs, to its end
  for (int signal : {SIGINT, SIGTERM}) sigaction(signal, &action, nullptr);
}

}  // namespace kvplan
