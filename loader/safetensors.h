// Read-only, memory-mapped access to Hugging Face safetensors checkpoints, single-file or sharded
// (model.safetensors.index.json). Every tensor's extent is checked against its file when the file is opened,
// so later reads cannot run past a truncated file.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/number_formats.h"

namespace kvplan {

enum class DType { kF32, kF16, kBF16, kI32 };
const char* DTypeName(DType dtype);

struct TensorInfo {
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  int64_t bytes = 0;
  std::string file;  // the shard it lives in, for error messages
  int64_t element_count() const;
};

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a model directory, whichever way they are sharded.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);
  static absl::StatusOr<std::unique_ptr<Checkpoint>> OpenFile(const std::string& path);

  absl::StatusOr<const TensorInfo*> Find(const std::string& name) const;
  // Converts to fp32; the shape must equal expected_shape (checked, named in the error).
  absl::StatusOr<std::vector<float>> ReadFloat(const std::string& name,
                                               const std::vector<int64_t>& expected_shape) const;
  absl::StatusOr<std::vector<int32_t>> ReadInt32(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
  std::string source_;  // the file or index the tensors came from
};

// Converts n elements of a tensor's raw data to fp32.
void ConvertToFloat(DType dtype, const uint8_t* data, int64_t n, float* out);

}  // namespace kvplan
