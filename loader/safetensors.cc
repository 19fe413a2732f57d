#include "loader/safetensors.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/input_file.h"
#include "base/status_macros.h"
#include "loader/json_input.h"
#include "loader/model_files.h"
#include "nlohmann/json.hpp"

namespace kvplan {
namespace {

using nlohmann::json;

absl::StatusOr<DType> ParseDType(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "I32") return DType::kI32;
  return absl::UnimplementedError(absl::StrCat("dtype ", name, " is not supported (supported: F32, F16, BF16, I32)"));
}

int ElementSize(DType dtype) { return dtype == DType::kF16 || dtype == DType::kBF16 ? 2 : 4; }

// Bytes a tensor of this (non-negative) shape holds, or nullopt when the count overflows int64.
std::optional<int64_t> ShapeBytes(const std::vector<int64_t>& shape, DType dtype) {
  int64_t bytes = ElementSize(dtype);
  for (int64_t dim : shape)
    if (__builtin_mul_overflow(bytes, dim, &bytes)) return std::nullopt;
  return bytes;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI32: return "I32";
  }
  return "?";
}

int64_t TensorInfo::element_count() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

void ConvertToFloat(DType dtype, const uint8_t* data, int64_t n, float* out) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out, data, n * sizeof(float)); return;
    case DType::kBF16:
    case DType::kF16: {
      const bool bf16 = dtype == DType::kBF16;
#pragma omp parallel for if (n > (1 << 20))
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, data + 2 * i, 2);
        out[i] = bf16 ? Bf16ToFloat(bits) : Fp16ToFloat(bits);
      }
      return;
    }
    case DType::kI32:
      for (int64_t i = 0; i < n; ++i) {
        int32_t value;
        std::memcpy(&value, data + 4 * i, 4);
        out[i] = float(value);
      }
      return;
  }
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  KVPLAN_ASSIGN_OR_RETURN(const InputFile input, InputFile::Open(path, "checkpoint"));
  const size_t size = size_t(input.size());
  if (size < 8) return absl::DataLossError(absl::StrCat(path, ": truncated safetensors file (", size, " bytes)"));
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, input.descriptor(), 0);
  if (mapping == MAP_FAILED) return absl::InternalError(absl::StrCat("cannot mmap ", path));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->mapping_ = mapping;
  file->mapping_size_ = size;

  const uint8_t* bytes = static_cast<const uint8_t*>(mapping);
  uint64_t header_size;
  std::memcpy(&header_size, bytes, 8);
  if (header_size > size - 8)
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_size, " exceeds file size ", size));
  KVPLAN_ASSIGN_OR_RETURN(
      const json header,
      ParseJsonInput(std::string_view(reinterpret_cast<const char*>(bytes) + 8, header_size), path + " header"));
  if (!header.is_object()) return absl::DataLossError(absl::StrCat(path, ": header is not a JSON object"));
  const uint8_t* data_begin = bytes + 8 + header_size;
  const uint64_t data_size = size - 8 - header_size;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = absl::StrCat("tensor \"", name, "\" in ", path);
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry["shape"].is_array() ||
        !entry.contains("data_offsets") || !entry["data_offsets"].is_array())
      return absl::DataLossError(absl::StrCat(where, ": malformed header entry"));
    TensorInfo tensor;
    try {
      absl::StatusOr<DType> dtype = ParseDType(entry["dtype"].get<std::string>());
      if (!dtype.ok()) return absl::Status(dtype.status().code(), absl::StrCat(where, ": ", dtype.status().message()));
      tensor.dtype = *dtype;
      for (const json& dim : entry["shape"]) {
        const std::optional<int64_t> size = JsonInteger<int64_t>(dim);
        if (!size.has_value() || *size < 0) return absl::DataLossError(absl::StrCat(where, ": bad shape"));
        tensor.shape.push_back(*size);
      }
      std::vector<uint64_t> offsets;
      for (const json& offset : entry["data_offsets"]) {
        const std::optional<uint64_t> value = JsonInteger<uint64_t>(offset);
        if (!value.has_value()) return absl::DataLossError(absl::StrCat(where, ": bad data_offsets"));
        offsets.push_back(*value);
      }
      if (offsets.size() != 2 || offsets[0] > offsets[1])
        return absl::DataLossError(absl::StrCat(where, ": bad data_offsets"));
      if (offsets[1] > data_size)
        return absl::DataLossError(absl::StrCat(where, ": data ends at byte ", offsets[1], " but the file holds ",
                                                data_size, " data bytes (truncated?)"));
      tensor.data = data_begin + offsets[0];
      tensor.bytes = int64_t(offsets[1] - offsets[0]);
    } catch (const json::exception& e) {
      return absl::DataLossError(absl::StrCat(where, ": malformed header entry: ", e.what()));
    }
    const std::optional<int64_t> shape_bytes = ShapeBytes(tensor.shape, tensor.dtype);
    if (shape_bytes != tensor.bytes)
      return absl::DataLossError(absl::StrCat(
          where, ": shape ", ShapeString(tensor.shape), " of ", DTypeName(tensor.dtype), " needs ",
          shape_bytes.has_value() ? absl::StrCat(*shape_bytes) : "over 2^63", " bytes, has ", tensor.bytes));
    tensor.file = path;
    file->tensors_.emplace(name, std::move(tensor));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::OpenFile(const std::string& path) {
  KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
  auto checkpoint = std::make_unique<Checkpoint>();
  checkpoint->tensors_ = file->tensors();
  checkpoint->source_ = path;
  checkpoint->files_.push_back(std::move(file));
  return checkpoint;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& model_dir) {
  const std::string single = ModelFile(model_dir, "model.safetensors");
  const std::string index_path = ModelFile(model_dir, "model.safetensors.index.json");
  if (::access(single.c_str(), F_OK) == 0) return OpenFile(single);
  if (::access(index_path.c_str(), F_OK) != 0)
    return absl::NotFoundError(absl::StrCat("no model.safetensors or model.safetensors.index.json in ", model_dir));
  KVPLAN_ASSIGN_OR_RETURN(const std::string text, ReadInputFile(index_path, "checkpoint index"));
  KVPLAN_ASSIGN_OR_RETURN(const json index, ParseJsonInput(text, index_path));
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    return absl::DataLossError(absl::StrCat(index_path, ": missing \"weight_map\""));

  auto checkpoint = std::make_unique<Checkpoint>();
  checkpoint->source_ = index_path;
  std::map<std::string, const SafetensorsFile*> opened;
  for (const auto& [name, shard_value] : index["weight_map"].items()) {
    if (!shard_value.is_string()) return absl::DataLossError(absl::StrCat(index_path, ": bad entry for ", name));
    const std::string shard = shard_value.get<std::string>();
    if (shard.find('/') != std::string::npos)
      return absl::DataLossError(absl::StrCat(index_path, ": shard name \"", shard, "\" must be a plain file name"));
    if (!opened.contains(shard)) {
      KVPLAN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                              SafetensorsFile::Open(ModelFile(model_dir, shard)));
      opened[shard] = file.get();
      checkpoint->files_.push_back(std::move(file));
    }
    const auto& shard_tensors = opened[shard]->tensors();
    const auto found = shard_tensors.find(name);
    if (found == shard_tensors.end())
      return absl::DataLossError(absl::StrCat("tensor \"", name, "\" is listed in ", index_path, " under ", shard,
                                              " but that file does not hold it"));
    checkpoint->tensors_.emplace(name, found->second);
  }
  return checkpoint;
}

absl::StatusOr<const TensorInfo*> Checkpoint::Find(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is missing from ", source_));
  }
  return &it->second;
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat(const std::string& name,
                                                         const std::vector<int64_t>& expected_shape) const {
  KVPLAN_ASSIGN_OR_RETURN(const TensorInfo* tensor, Find(name));
  const TensorInfo& info = *tensor;
  if (info.shape != expected_shape)
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" in ", info.file, " has shape ",
                                                   ShapeString(info.shape), ", expected ",
                                                   ShapeString(expected_shape)));
  if (info.dtype == DType::kI32)
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" in ", info.file, " is I32, expected float"));
  std::vector<float> values(info.element_count());
  ConvertToFloat(info.dtype, info.data, info.element_count(), values.data());
  return values;
}

absl::StatusOr<std::vector<int32_t>> Checkpoint::ReadInt32(const std::string& name) const {
  KVPLAN_ASSIGN_OR_RETURN(const TensorInfo* tensor, Find(name));
  const TensorInfo& info = *tensor;
  if (info.dtype != DType::kI32)
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", name, "\" in ", info.file, " is ", DTypeName(info.dtype), ", expected I32"));
  std::vector<int32_t> values(info.element_count());
  std::memcpy(values.data(), info.data, info.bytes);
  return values;
}

}  // namespace kvplan
