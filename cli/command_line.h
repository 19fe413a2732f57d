// kvplan's command line: each subcommand's flags, checked by CLI11 validators (no empty lists, no zero or
// negative sizes, existing inputs), fill the option structs of cli/commands.h.
#pragma once

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "cli/commands.h"

namespace kvplan {

class CommandLine {
 public:
  CommandLine();
  CommandLine(const CommandLine&) = delete;
  CommandLine& operator=(const CommandLine&) = delete;

  // Parse with this (CLI11 reports usage errors as exceptions, which CLI11_PARSE turns into an exit code).
  CLI::App& app() { return app_; }
  // Runs the subcommand the parsed arguments chose.
  absl::Status Run() const;

 private:
  // One per subcommand: each declares its options into the command struct it fills.
  void AddGenerateCommand();
  void AddEvalCommand();
  void AddBenchCommand();
  void AddCalibrateCommand();
  void AddSweepCommand();
  void AddInspectCommands();
  void AddServeCommand();
  CLI::App app_{"kvplan: KV-cache compression plans for Llama-family models"};
  GenerateCommand generate_;
  EvalCommand eval_;
  BenchCommand bench_;
  CalibrateCommand calibrate_;
  SweepCommand sweep_;
  InspectCommand inspect_;
  ValidateCommand validate_;
  ServeOptions serve_;
};

}  // namespace kvplan
