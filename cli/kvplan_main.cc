// kvplan: thin CLI11 front end; each subcommand fills an options struct and calls the library.
#include <cstdio>
#include <string>

#include "cli/command_line.h"
#include "cli/interruption.h"

int main(int argc, char** argv) {
  kvplan::CommandLine command_line;
  CLI11_PARSE(command_line.app(), argc, argv);
  kvplan::ExitOnInterruption();
  const absl::Status status = command_line.Run();
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
