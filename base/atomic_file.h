// Files kvplan writes appear whole or not at all: the bytes go to a temporary file beside the target, are synced,
// and the temporary is renamed over the target. An interrupted command or two processes writing one path never
// leave a torn file.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace kvplan {

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes);

}  // namespace kvplan
