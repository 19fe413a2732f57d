// Files kvplan writes appear whole or not at all: the bytes go to a temporary file beside the target, are synced,
// and the temporary is renamed over the target. An interrupted command or two processes writing one path never
// leave a torn file.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace kvplan {

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes);

// For a signal handler that ends the process: removes the temporary file of the WriteFileAtomically in progress,
// if any, so that an interrupted write leaves nothing behind. Async-signal-safe. kvplan writes its files from one
// thread; with several concurrent writers only the latest one's temporary would be known.
void RemoveTemporaryFileInProgress();

}  // namespace kvplan
