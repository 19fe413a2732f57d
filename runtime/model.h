// The interface every runtime (CPU reference, CUDA) implements: run rows of tokens through the model,
// appending to per-sequence KV caches, and return logits.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "loader/model_config.h"

namespace kvplan {

struct PlanPolicies;

// One forward step: row r feeds tokens[r] at positions[r] of sequence sequences[r]. Rows of one sequence
// must be consecutive positions in order, continuing that sequence's cache.
struct StepRows {
  std::vector<int32_t> tokens;
  std::vector<int32_t> sequences;
  std::vector<int32_t> positions;
};

enum class LogitRows {
  kAll,              // [rows, vocab]
  kLastPerSequence,  // [distinct sequences in order of appearance, vocab]
};

// Sees a layer's tensors during a forward pass (calibration collects statistics through it).
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // [rows, heads, head_dim] queries and [rows, kv_heads, head_dim] keys after RoPE; keys before RoPE; values.
  virtual void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                         const float* v) = 0;
  // The GPU runtime first offers a layer's tensors where they are, in device memory (same layouts; valid until
  // the call returns; `stream`, a cudaStream_t, orders work on them). An observer that reduces them there returns
  // true and is not shown them on the host.
  virtual bool OnDeviceLayerKv(int /*layer*/, int /*rows*/, const float* /*q*/, const float* /*k*/,
                               const float* /*k_pre_rope*/, const float* /*v*/, void* /*stream*/) {
    return false;
  }
  // [rows, hidden] after the final norm.
  virtual void OnFinalHidden(int rows, const float* hidden) = 0;
  // Whether OnLayerKv is wanted: the GPU runtime copies every layer's tensors to the host for it.
  virtual bool WantsLayerKv() const { return true; }
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  virtual int num_sequences() const = 0;
  virtual int capacity() const = 0;  // positions each sequence's cache holds
  virtual std::string device_name() const = 0;

  virtual absl::StatusOr<std::vector<float>> Forward(const StepRows& rows, LogitRows which) = 0;
  // Forgets every sequence's cache.
  virtual void Reset() = 0;
  // Forgets one sequence's cache while the others keep theirs: a serving loop gives the sequence to a new request
  // while the rest of the batch decodes on. OutOfRange for a sequence the model does not have.
  virtual absl::Status ResetSequence(int sequence) = 0;
  // Executes `policies` (runtime/cache/plan_policies.h; null: the full cache) from now on, keeping the weights;
  // every sequence starts empty. Calibration tries one candidate plan after another on one loaded model.
  virtual absl::Status UsePolicies(std::shared_ptr<const PlanPolicies> policies) = 0;
  // Fills positions [0, context) of every sequence's cache with random values, so decode speed at a long
  // context can be measured without running the prefill.
  virtual absl::Status FillCacheWithNoise(int context) = 0;
  // Bytes the KV caches of all sequences hold now, counting K/V as bf16 (the GPU's storage) whatever the
  // runtime's working precision, and compressed entries at their packed size.
  virtual int64_t kv_cache_bytes() const = 0;
  // Positions all sequences have processed: what a full cache would hold now.
  virtual int64_t cached_positions() const = 0;
  // Bytes the weights occupy on the model's device.
  virtual int64_t weight_bytes() const = 0;
};

// Checks rows against the sequences' current lengths: ids inside the vocabulary, known sequences whose rows are
// consecutive, positions continuing each sequence and inside the cache capacity.
absl::Status ValidateStepRows(const StepRows& rows, const ModelConfig& config, const std::vector<int32_t>& lengths,
                              int capacity);

// OutOfRange unless 0 <= sequence < num_sequences.
absl::Status CheckSequence(int sequence, int num_sequences);

// Rows per pass and sequence when a plan compresses the cache, so eviction keeps up with a long prompt. Both
// runtimes chunk alike, so they compress at the same points.
inline constexpr int kPlannedChunkRows = 128;

// Where a step's rows split into passes so that no pass appends more than max_rows_per_sequence rows to one
// sequence (compressed caches evict between passes and never hold a whole long prompt); 0: one pass. Returns
// the pass boundaries [0, ..., rows].
std::vector<int> ChunkRows(const StepRows& rows, int max_rows_per_sequence);

// Rows for feeding `tokens` to one sequence starting at `first_position`.
StepRows SequenceRows(const std::vector<int32_t>& tokens, int sequence, int first_position);

}  // namespace kvplan
