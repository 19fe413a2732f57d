// A compressed layer's arrays (kernels/compressed_arrays.h) and its RefreshKV state in device memory: the CUDA
// runtime's storage, and the device twin of a HostCompressedLayer for the kernel tests and the kernel bench.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/compressed_layout.h"
#include "runtime/cache/host_compressed_layer.h"
#include "runtime/cuda/device_memory.h"

namespace kvplan {

// Device buffers are untyped; the views give them their element types.
template <typename>
using DeviceArray = DeviceBuffer;

struct DeviceCompressedLayer : CompressedArrays<DeviceArray> {
  // Every array `shape` keeps for regions with these bounds: the bounds copied, the other arrays uninitialised
  // (a reset zeroes what says which entries are live).
  absl::Status Allocate(const CompressedArrayShape& layer_shape, const std::vector<int32_t>& dense_bounds,
                        const std::vector<int32_t>& coded_bounds) {
    shape = layer_shape;
    KVPLAN_RETURN_IF_ERROR(dense_begin.Upload(dense_bounds));
    KVPLAN_RETURN_IF_ERROR(coded_begin.Upload(coded_bounds));
    const int64_t dense_slots = dense_bounds.back(), coded_slots = coded_bounds.back();
    absl::Status status;
    ForEachArray(
        [&](const ArraySpec& spec, DeviceBuffer& buffer) {
          const int64_t bytes = ArrayElements(spec, shape, dense_slots, coded_slots) * spec.element_bytes;
          if (status.ok() && !spec.is_bounds() && bytes > 0) status = buffer.Allocate(bytes);
        },
        *this);
    return status;
  }

  // A copy of every array of `host`.
  absl::Status Upload(const HostCompressedLayer& host) {
    shape = host.shape;
    absl::Status status;
    ForEachArray(
        [&](const ArraySpec&, DeviceBuffer& buffer, const auto& values) {
          if (status.ok() && !values.empty()) status = buffer.Upload(values);
        },
        *this, host);
    return status;
  }

  // Every array copied back into `host`, a layer of the same shape and regions (synchronously, after the work
  // queued on the legacy default stream).
  absl::Status Download(HostCompressedLayer& host) const {
    absl::Status status;
    ForEachArray(
        [&](const ArraySpec& spec, const DeviceBuffer& buffer, auto& values) {
          const size_t bytes = values.size() * sizeof(values[0]);
          if (!status.ok()) return;
          if (bytes != buffer.bytes())
            status = absl::InternalError(
                absl::StrCat(spec.name, ": ", buffer.bytes(), " bytes on the device, ", bytes, " on the host"));
          else if (bytes > 0)
            status = CudaStatus(cudaMemcpy(values.data(), buffer.as<void>(), bytes, cudaMemcpyDeviceToHost),
                                "layer download");
        },
        *this, host);
    return status;
  }

  // Forgets sequences [first, end) on `stream`: zeroes their rows of the arrays a reset clears (layout::kZeroed).
  // Each of those holds the same bytes per sequence, sequence-major.
  absl::Status ResetSequences(int first, int end, cudaStream_t stream) {
    const int sequences = shape.head_slots / shape.kv_heads;
    absl::Status status;
    ForEachArray(
        [&](const ArraySpec& spec, DeviceBuffer& buffer) {
          const size_t per_sequence = buffer.bytes() / sequences;
          if (status.ok() && spec.reset == layout::kZeroed && per_sequence > 0)
            status = CudaStatus(
                cudaMemsetAsync(buffer.as<char>() + first * per_sequence, 0, (end - first) * per_sequence, stream),
                "layer reset");
        },
        *this);
    return status;
  }

  // Bytes of the arrays of CompressedLayer but the region bounds: the entries, their counts and merged slots, as
  // reserved_bytes reports them. The bounds and the RefreshKV state (a few words per sequence) are not counted.
  int64_t bytes() const {
    int64_t total = 0;
    ForEachLayerArray(
        [&](const ArraySpec& spec, const DeviceBuffer& buffer) {
          if (!spec.is_bounds()) total += int64_t(buffer.bytes());
        },
        *this);
    return total;
  }

  CompressedLayer View() const { return LayerView(shape, *this, Pointer); }
  RefreshStateView RefreshView() const { return kvplan::RefreshView(*this, Pointer); }

  CompressedArrayShape shape;

 private:
  static void* Pointer(const DeviceBuffer& buffer) { return buffer.as_or_null<void>(); }
};

}  // namespace kvplan
