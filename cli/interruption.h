// Ctrl-C (SIGINT) and SIGTERM end a command at once, with status 128 + the signal (130, 143), after printing what
// they interrupted. The handler exits itself rather than setting a flag for the libraries' progress callbacks to
// poll: callbacks come seconds apart in some stages (a dictionary, a long prefill) and never in bench or generate,
// and a flag would need a cancellation path through every library loop. Exiting loses nothing: every output is
// written atomically at the end, and the handler removes the temporary file of a write in progress.
#pragma once

#include <string_view>

namespace kvplan {

void ExitOnInterruption();

// What an interruption now would stop, completing "interrupted during ...", e.g. "calibration stage
// 'dictionaries'; no plan written". Called from one thread at a time.
void SetInterruptedActivity(std::string_view activity);

}  // namespace kvplan
