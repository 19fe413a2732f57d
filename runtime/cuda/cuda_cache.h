// The CUDA runtime's KV cache for every layer of a cache policy. Full-cache layers share one bf16 array
// [slot, sequence, kv_head, capacity, head_dim]; compressed layers hold the arrays of kernels/compressed_layout.h
// and run the CUDA kernels in the order runtime/cache/compressed_step.h fixes; sharing layers read their
// donor's storage. Each pass's metadata (rows, their grouping by sequence, the entry counts the policy fixes for
// every compressed layer) is written to pinned memory and sent with one copy, and no kernel's launch depends on
// a count held on the device: a pass never reads the device back, and a decode step can be captured in a CUDA
// graph and replayed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/model_config.h"
#include "plans/cache_policy.h"
#include "runtime/cache/compressed_cache.h"
#include "runtime/model.h"

namespace kvplan {

struct CudaCacheOptions {
  int num_sequences = 1;
  int capacity = 0;  // positions per sequence
  int max_rows = 0;  // most rows of one pass
};

class CudaKvCache {
 public:
  virtual ~CudaKvCache() = default;

  // Most rows of one sequence in one pass: ChunkRows' limit when the policy compresses a layer (eviction must
  // keep up with a long prompt), else 0 (one pass).
  virtual int max_rows_per_sequence() const = 0;

  // Stages rows [begin, end) of `rows` as the pass the following Layer calls run, and queues their upload on the
  // cache's stream. The device copies of the pass's tokens, sequences and positions are then these:
  virtual absl::Status BeginPass(const StepRows& rows, int begin, int end) = 0;
  // CUDA graphs: StageGraphPass writes a whole step's metadata to the pinned memory a captured graph copies from;
  // UploadGraphPass, called while capturing, queues that copy. A replay after StageGraphPass runs the new step.
  virtual absl::Status StageGraphPass(const StepRows& rows) = 0;
  virtual absl::Status UploadGraphPass() = 0;
  virtual const int32_t* tokens() const = 0;
  virtual const int32_t* row_sequence() const = 0;
  virtual const int32_t* row_position() const = 0;

  // One layer of the pass: q ([rows, heads, head_dim], after RoPE), keys before RoPE (rotated here, in place)
  // and values ([rows, kv_heads, head_dim], fp32); the attention output ([rows, heads, head_dim], bf16) goes to
  // out. Layers run in order.
  virtual absl::Status Layer(int layer, const float* q, float* keys, const float* values, __nv_bfloat16* out) = 0;

  // Forgets every sequence, or one.
  virtual absl::Status Reset() = 0;
  virtual absl::Status ResetSequence(int sequence) = 0;
  // Every sequence holds `context` positions of noise, in the amounts the policy implies (benchmarks).
  virtual absl::Status FillWithNoise(int context) = 0;
  // Device bytes the cache arrays take, whatever they hold now.
  virtual int64_t reserved_bytes() const = 0;
  // Entry counts of every head slot of a compressed layer, read back (tests compare them with the policy's).
  virtual absl::StatusOr<std::vector<HeadEntries>> ReadHeadEntries(int layer) const = 0;
};

// `codebooks`: [num_layers], the coded layers' codebooks (PlanPolicies::codebooks); empty for a policy
// that codes nothing.
absl::StatusOr<std::unique_ptr<CudaKvCache>> CreateCudaKvCache(
    const ModelConfig& config, const CachePolicy& policy,
    const std::vector<std::shared_ptr<const LayerCodebook>>& codebooks, const CudaCacheOptions& options,
    cudaStream_t stream);

}  // namespace kvplan
