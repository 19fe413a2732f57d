// Paths inside a Hugging Face model directory, however the directory was spelt ("dir" or "dir/"), so that no
// message names "dir//config.json".
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

namespace kvplan {

inline std::string ModelFile(const std::string& model_dir, std::string_view name) {
  return (std::filesystem::path(model_dir) / name).string();
}

}  // namespace kvplan
