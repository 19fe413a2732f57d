#include "cli/command_files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/input_file.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "plans/plan_io.h"
#include "sweep/sweep_report.h"

namespace kvplan {
namespace {

const char* KindName(OutputKind kind) {
  switch (kind) {
    case OutputKind::kPlan: return "plan";
    case OutputKind::kEvalReport: return "eval report";
    case OutputKind::kNeedlePrompts: return "needle prompts";
    case OutputKind::kSweepTable: return "sweep table";
    case OutputKind::kSweepPlot: return "sweep plot";
  }
  return "output";
}

std::optional<struct stat> Stat(const std::string& path) {
  struct stat info;
  if (stat(path.c_str(), &info) != 0) return std::nullopt;
  return info;
}

// The start of a file: enough to recognise a sweep table or plot, whatever the file's size.
std::string FileStart(const std::string& path) {
  constexpr size_t kBytes = 4096;
  std::string start(kBytes, '\0');
  std::ifstream file(path, std::ios::binary);
  file.read(start.data(), kBytes);
  start.resize(file.gcount());
  return start;
}

// The existing file at `path` is what kvplan writes as `kind`: a readable plan; the JSON eval report (it leads
// with schema_version); the needle trials as a JSON array of {length, key, ids}; a sweep's CSV table or SVG plot.
bool HoldsKind(const std::string& path, OutputKind kind) {
  if (kind == OutputKind::kPlan) return ReadPlanFile(path).ok();
  if (kind == OutputKind::kSweepTable) return IsSweepCsv(FileStart(path));
  if (kind == OutputKind::kSweepPlot) return IsSweepSvg(FileStart(path));
  const nlohmann::json json = nlohmann::json::parse(std::ifstream(path), nullptr, /*allow_exceptions=*/false);
  if (kind == OutputKind::kEvalReport) return json.is_object() && json.contains("schema_version");
  if (!json.is_array()) return false;
  for (const nlohmann::json& trial : json)
    if (!trial.is_object() || !trial.contains("length") || !trial.contains("key") || !trial.contains("ids"))
      return false;
  return true;
}

absl::Status CheckOutputFile(const OutputFile& output, const std::vector<struct stat>& inputs, bool force) {
  const char* kind = KindName(output.kind);
  if (output.path.empty()) return absl::InvalidArgumentError(absl::StrCat("the ", kind, " path is empty"));
  const std::filesystem::path parent = std::filesystem::path(output.path).parent_path();
  const std::string directory = parent.empty() ? std::string(".") : parent.string();
  const std::optional<struct stat> directory_info = Stat(directory);
  if (!directory_info || !S_ISDIR(directory_info->st_mode))
    return absl::NotFoundError(
        absl::StrCat("cannot write the ", kind, " to ", output.path, ": ", directory, " is not a directory"));
  if (access(directory.c_str(), W_OK | X_OK) != 0)
    return absl::PermissionDeniedError(
        absl::StrCat("cannot write the ", kind, " to ", output.path, ": directory ", directory, " is not writable"));
  const std::optional<struct stat> existing = Stat(output.path);
  if (!existing) return absl::OkStatus();
  if (S_ISDIR(existing->st_mode))
    return absl::InvalidArgumentError(absl::StrCat("cannot write the ", kind, " to ", output.path, ": a directory"));
  // The atomic rename would put a regular file in the place of a device node or a FIFO, --force or not.
  if (!S_ISREG(existing->st_mode))
    return absl::InvalidArgumentError(absl::StrCat("cannot write the ", kind, " to ", output.path, ": it is ",
                                                   FileKindName(existing->st_mode), "; name a regular file"));
  for (const struct stat& input : inputs)
    if (input.st_dev == existing->st_dev && input.st_ino == existing->st_ino)
      return absl::InvalidArgumentError(
          absl::StrCat("refusing to write the ", kind, " over ", output.path, ": this command reads that file"));
  if (!force && !HoldsKind(output.path, output.kind))
    return absl::AlreadyExistsError(absl::StrCat("refusing to overwrite ", output.path, ": it is not a kvplan ", kind,
                                                 " (pass --force to replace it)"));
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> ModelFiles(const std::string& model_dir) {
  std::vector<std::string> files;
  for (const char* name : {"config.json", "tokenizer.json", "model.safetensors.index.json"})
    files.push_back((std::filesystem::path(model_dir) / name).string());
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(model_dir, error))
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
  return files;
}

absl::Status CheckOutputFiles(const CommandFiles& files, bool force) {
  std::vector<struct stat> inputs;
  for (const std::string& path : files.reads)
    if (const std::optional<struct stat> info = Stat(path)) inputs.push_back(*info);
  for (const OutputFile& output : files.writes) KVPLAN_RETURN_IF_ERROR(CheckOutputFile(output, inputs, force));
  // Two outputs on one file: the second would silently replace the first.
  for (size_t i = 0; i < files.writes.size(); ++i)
    for (size_t j = i + 1; j < files.writes.size(); ++j) {
      const OutputFile &first = files.writes[i], &second = files.writes[j];
      const std::optional<struct stat> a = Stat(first.path), b = Stat(second.path);
      const bool same = a && b ? a->st_dev == b->st_dev && a->st_ino == b->st_ino
                               : std::filesystem::path(first.path).lexically_normal() ==
                                     std::filesystem::path(second.path).lexically_normal();
      if (same)
        return absl::InvalidArgumentError(absl::StrCat("the ", KindName(first.kind), " and the ",
                                                       KindName(second.kind), " would both be written to ",
                                                       second.path, "; name two files"));
    }
  return absl::OkStatus();
}

}  // namespace kvplan
