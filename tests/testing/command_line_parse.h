// Parsing a kvplan command line in tests, without running it.
#pragma once

#include <string>
#include <vector>

#include "cli/command_line.h"

namespace kvplan::testing {

// The error CLI11 reports for `kvplan <arguments>`, or "" when it parses.
inline std::string CommandLineParseError(const std::vector<std::string>& arguments) {
  CommandLine command_line;
  std::vector<const char*> argv = {"kvplan"};
  for (const std::string& argument : arguments) argv.push_back(argument.c_str());
  try {
    command_line.app().parse(int(argv.size()), argv.data());
  } catch (const CLI::ParseError& error) {
    return error.what();
  }
  return "";
}

}  // namespace kvplan::testing
