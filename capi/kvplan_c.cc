// The C API over the runtime: each entry point checks its pointers, runs the C++ call and turns its Status into a
// kvplan_status and this thread's error message. No exception leaves the library (a C caller could not catch it):
// the ones the standard library may throw (std::bad_alloc) become KVPLAN_INTERNAL.
#include "capi/kvplan.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/build_info.h"
#include "base/status_macros.h"
#include "loader/tokenizer.h"
#include "loader/open_model.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "runtime/cache/plan_policies.h"
#include "runtime/model.h"
#include "runtime/sampling.h"

struct kvplan_model {
  kvplan::LoadedModel loaded;
};

struct kvplan_plan {
  kvplan::plan::Plan plan;
};

struct kvplan_cache {
  std::unique_ptr<kvplan::Model> model;
  std::vector<int32_t> lengths;  // [num_sequences] positions each sequence has processed
  std::string device_name;
  int max_rows = 0;  // rows per Forward: prompts longer than this are fed in passes
};

struct kvplan_sampler {
  kvplan::Sampler sampler;
};

namespace kvplan {
namespace {

thread_local std::string last_error;

kvplan_status StatusCodeOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return KVPLAN_OK;
    case absl::StatusCode::kInvalidArgument: return KVPLAN_INVALID_ARGUMENT;
    case absl::StatusCode::kNotFound: return KVPLAN_NOT_FOUND;
    case absl::StatusCode::kFailedPrecondition: return KVPLAN_FAILED_PRECONDITION;
    case absl::StatusCode::kOutOfRange: return KVPLAN_OUT_OF_RANGE;
    case absl::StatusCode::kDataLoss: return KVPLAN_DATA_LOSS;
    case absl::StatusCode::kUnimplemented: return KVPLAN_UNIMPLEMENTED;
    case absl::StatusCode::kInternal: return KVPLAN_INTERNAL;
    // abseil asks for a default: it may add codes.
    default: return KVPLAN_UNKNOWN;
  }
}

// The device travels as an int32_t: a C caller may pass any integer, and a C++ enum holding one outside its
// values is undefined behaviour.
absl::StatusOr<Backend> BackendOf(int32_t device) {
  if (device == KVPLAN_DEVICE_AUTO) return Backend::kAuto;
  if (device == KVPLAN_DEVICE_CPU) return Backend::kCpu;
  if (device == KVPLAN_DEVICE_CUDA) return Backend::kCuda;
  return absl::InvalidArgumentError(absl::StrCat("device ", device, " is not a kvplan_device"));
}

// Runs `body` (returning absl::Status) for the C function `function`; a failure's message, prefixed with the
// function's name, becomes this thread's last error.
template <typename Body>
kvplan_status Run(const char* function, Body&& body) {
  absl::Status status;
  try {
    status = body();
  } catch (const std::exception& error) {
    status = absl::InternalError(error.what());
  } catch (...) {
    status = absl::InternalError("an unknown exception");
  }
  if (!status.ok()) last_error = absl::StrCat(function, ": ", status.message());
  return StatusCodeOf(status.code());
}

absl::Status NotNull(const void* pointer, const char* name) {
  if (pointer == nullptr) return absl::InvalidArgumentError(absl::StrCat(name, " is NULL"));
  return absl::OkStatus();
}

// Copies `logits` ([rows, vocab]) to `out` when the caller wants them.
void CopyLogits(const std::vector<float>& logits, float* out) {
  if (out != nullptr) std::copy(logits.begin(), logits.end(), out);
}

}  // namespace
}  // namespace kvplan

using kvplan::CopyLogits;
using kvplan::NotNull;
using kvplan::Run;

extern "C" {

const char* kvplan_last_error(void) { return kvplan::last_error.c_str(); }

const char* kvplan_version(void) { return kvplan::kKvplanVersion; }

int32_t kvplan_c_api_version(void) { return KVPLAN_C_API_VERSION; }

kvplan_status kvplan_model_open(const char* model_dir, kvplan_model** model) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(model_dir, "model_dir"));
    KVPLAN_RETURN_IF_ERROR(NotNull(model, "model"));
    *model = nullptr;
    auto opened = std::make_unique<kvplan_model>();
    KVPLAN_ASSIGN_OR_RETURN(opened->loaded, kvplan::OpenModel(model_dir));
    *model = opened.release();
    return absl::OkStatus();
  });
}

void kvplan_model_free(kvplan_model* model) { delete model; }

int32_t kvplan_model_vocab_size(const kvplan_model* model) {
  return model != nullptr ? model->loaded.config.vocab_size : 0;
}

int32_t kvplan_model_max_positions(const kvplan_model* model) {
  return model != nullptr ? model->loaded.config.max_position_embeddings : 0;
}

int32_t kvplan_model_bos_token(const kvplan_model* model) {
  return model != nullptr ? model->loaded.config.bos_token_id : -1;
}

int32_t kvplan_model_eos_token(const kvplan_model* model) {
  return model != nullptr ? model->loaded.config.eos_token_id : -1;
}

kvplan_status kvplan_tokenize(const kvplan_model* model, const char* text, int32_t add_bos, int32_t* tokens,
                              size_t capacity, size_t* count) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(model, "model"));
    KVPLAN_RETURN_IF_ERROR(NotNull(text, "text"));
    KVPLAN_RETURN_IF_ERROR(NotNull(count, "count"));
    const std::vector<int32_t> ids =
        add_bos != 0 ? model->loaded.EncodePrompt(text) : model->loaded.tokenizer->Encode(text);
    *count = ids.size();
    if (ids.size() > capacity)
      return absl::OutOfRangeError(
          absl::StrCat("the text has ", ids.size(), " tokens, the buffer room for ", capacity));
    KVPLAN_RETURN_IF_ERROR(NotNull(tokens, "tokens"));
    std::copy(ids.begin(), ids.end(), tokens);
    return absl::OkStatus();
  });
}

kvplan_status kvplan_detokenize(const kvplan_model* model, const int32_t* tokens, size_t count, char* text,
                                size_t capacity, size_t* length) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(model, "model"));
    KVPLAN_RETURN_IF_ERROR(NotNull(length, "length"));
    if (count > 0) KVPLAN_RETURN_IF_ERROR(NotNull(tokens, "tokens"));
    const std::vector<int32_t> ids(tokens, tokens + count);
    for (size_t i = 0; i < count; ++i)
      if (ids[i] < 0 || ids[i] >= model->loaded.tokenizer->vocab_size())
        return absl::InvalidArgumentError(
            absl::StrCat("token ", i, " is ", ids[i], ", outside the vocabulary of ", model->loaded.tokenizer->vocab_size()));
    const std::string decoded = model->loaded.tokenizer->Decode(ids);
    *length = decoded.size();
    if (decoded.size() + 1 > capacity)
      return absl::OutOfRangeError(
          absl::StrCat("the text has ", decoded.size(), " bytes and a NUL, the buffer room for ", capacity));
    KVPLAN_RETURN_IF_ERROR(NotNull(text, "text"));
    std::memcpy(text, decoded.c_str(), decoded.size() + 1);
    return absl::OkStatus();
  });
}

kvplan_status kvplan_plan_open(const kvplan_model* model, const char* plan_path, kvplan_plan** plan) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(model, "model"));
    KVPLAN_RETURN_IF_ERROR(NotNull(plan_path, "plan_path"));
    KVPLAN_RETURN_IF_ERROR(NotNull(plan, "plan"));
    *plan = nullptr;
    auto opened = std::make_unique<kvplan_plan>();
    KVPLAN_ASSIGN_OR_RETURN(opened->plan, kvplan::ReadPlanFile(plan_path));
    KVPLAN_RETURN_IF_ERROR(
        kvplan::PoliciesFromPlan(opened->plan, model->loaded.config, *model->loaded.weights).status());
    *plan = opened.release();
    return absl::OkStatus();
  });
}

void kvplan_plan_free(kvplan_plan* plan) { delete plan; }

kvplan_status kvplan_cache_create(const kvplan_model* model, const kvplan_plan* plan, int32_t num_sequences,
                                  int32_t capacity, int32_t device, kvplan_cache** cache) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(model, "model"));
    KVPLAN_RETURN_IF_ERROR(NotNull(cache, "cache"));
    *cache = nullptr;
    if (num_sequences <= 0)
      return absl::InvalidArgumentError(absl::StrCat("num_sequences is ", num_sequences, ", not positive"));
    if (capacity < 0) return absl::InvalidArgumentError(absl::StrCat("capacity is ", capacity, ", negative"));
    KVPLAN_ASSIGN_OR_RETURN(const kvplan::Backend backend, kvplan::BackendOf(device));
    const int max_positions = model->loaded.config.max_position_embeddings;
    // Positions past the model's give quietly wrong results unless RoPE is scaled for them.
    if (max_positions > 0 && capacity > max_positions)
      return absl::OutOfRangeError(
          absl::StrCat("capacity ", capacity, " exceeds the model's max_position_embeddings of ", max_positions));
    const int positions = capacity > 0 ? capacity : max_positions;
    auto created = std::make_unique<kvplan_cache>();
    // A decode step has a row per sequence; prompts go in passes of the runtime's default row count.
    created->max_rows = std::max<int>(num_sequences, std::min(positions, kvplan::ModelOptions().max_rows));
    KVPLAN_ASSIGN_OR_RETURN(created->model, kvplan::CreateModel(model->loaded.config, *model->loaded.weights,
                                                                {.backend = backend,
                                                                 .num_sequences = num_sequences,
                                                                 .capacity = capacity,
                                                                 .max_rows = created->max_rows,
                                                                 .plan = plan != nullptr ? &plan->plan : nullptr}));
    created->lengths.assign(num_sequences, 0);
    created->device_name = created->model->device_name();
    *cache = created.release();
    return absl::OkStatus();
  });
}

void kvplan_cache_free(kvplan_cache* cache) { delete cache; }

int32_t kvplan_cache_num_sequences(const kvplan_cache* cache) {
  return cache != nullptr ? int32_t(cache->lengths.size()) : 0;
}

int32_t kvplan_cache_capacity(const kvplan_cache* cache) { return cache != nullptr ? cache->model->capacity() : 0; }

int32_t kvplan_cache_sequence_length(const kvplan_cache* cache, int32_t sequence) {
  if (cache == nullptr || !kvplan::CheckSequence(sequence, int(cache->lengths.size())).ok()) return -1;
  return cache->lengths[sequence];
}

int64_t kvplan_cache_bytes(const kvplan_cache* cache) { return cache != nullptr ? cache->model->kv_cache_bytes() : 0; }

const char* kvplan_cache_device_name(const kvplan_cache* cache) {
  return cache != nullptr ? cache->device_name.c_str() : "";
}

void kvplan_cache_reset(kvplan_cache* cache) {
  if (cache == nullptr) return;
  cache->model->Reset();
  std::fill(cache->lengths.begin(), cache->lengths.end(), 0);
}

kvplan_status kvplan_cache_reset_sequence(kvplan_cache* cache, int32_t sequence) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(cache, "cache"));
    KVPLAN_RETURN_IF_ERROR(cache->model->ResetSequence(sequence));
    cache->lengths[sequence] = 0;
    return absl::OkStatus();
  });
}

kvplan_status kvplan_prefill(kvplan_cache* cache, int32_t sequence, const int32_t* tokens, size_t count,
                             float* logits) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(cache, "cache"));
    KVPLAN_RETURN_IF_ERROR(NotNull(tokens, "tokens"));
    KVPLAN_RETURN_IF_ERROR(kvplan::CheckSequence(sequence, int(cache->lengths.size())));
    if (count == 0) return absl::InvalidArgumentError("no tokens to prefill");
    const int64_t length = cache->lengths[sequence];
    if (length + int64_t(count) > cache->model->capacity())
      return absl::OutOfRangeError(absl::StrCat("sequence ", sequence, " holds ", length, " positions; ", count,
                                                " more exceed its capacity of ", cache->model->capacity()));
    for (size_t first = 0; first < count; first += size_t(cache->max_rows)) {
      const size_t rows = std::min(count - first, size_t(cache->max_rows));
      const std::vector<int32_t> pass(tokens + first, tokens + first + rows);
      KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> last,
                              cache->model->Forward(kvplan::SequenceRows(pass, sequence, cache->lengths[sequence]),
                                                    kvplan::LogitRows::kLastPerSequence));
      cache->lengths[sequence] += int32_t(rows);
      if (first + rows == count) CopyLogits(last, logits);
    }
    return absl::OkStatus();
  });
}

kvplan_status kvplan_decode(kvplan_cache* cache, const int32_t* sequences, const int32_t* tokens, size_t count,
                            float* logits) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(cache, "cache"));
    KVPLAN_RETURN_IF_ERROR(NotNull(sequences, "sequences"));
    KVPLAN_RETURN_IF_ERROR(NotNull(tokens, "tokens"));
    if (count == 0) return absl::InvalidArgumentError("no sequences to decode");
    kvplan::StepRows rows;
    std::vector<bool> seen(cache->lengths.size(), false);
    for (size_t i = 0; i < count; ++i) {
      KVPLAN_RETURN_IF_ERROR(kvplan::CheckSequence(sequences[i], int(cache->lengths.size())));
      if (seen[sequences[i]])
        return absl::InvalidArgumentError(absl::StrCat("sequence ", sequences[i], " appears twice in one step"));
      seen[sequences[i]] = true;
      rows.tokens.push_back(tokens[i]);
      rows.sequences.push_back(sequences[i]);
      rows.positions.push_back(cache->lengths[sequences[i]]);
    }
    KVPLAN_ASSIGN_OR_RETURN(const std::vector<float> step,
                            cache->model->Forward(rows, kvplan::LogitRows::kLastPerSequence));
    for (size_t i = 0; i < count; ++i) ++cache->lengths[sequences[i]];
    CopyLogits(step, logits);
    return absl::OkStatus();
  });
}

kvplan_status kvplan_sampler_create(float temperature, int32_t top_k, float top_p, uint64_t seed,
                                    kvplan_sampler** sampler) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(sampler, "sampler"));
    *sampler = nullptr;
    KVPLAN_ASSIGN_OR_RETURN(
        kvplan::Sampler created,
        kvplan::Sampler::Create({.temperature = temperature, .top_k = top_k, .top_p = top_p, .seed = seed}));
    *sampler = new kvplan_sampler{std::move(created)};
    return absl::OkStatus();
  });
}

void kvplan_sampler_free(kvplan_sampler* sampler) { delete sampler; }

kvplan_status kvplan_sample(kvplan_sampler* sampler, const float* logits, int32_t vocab_size, int32_t* token) {
  return Run(__func__, [&]() -> absl::Status {
    KVPLAN_RETURN_IF_ERROR(NotNull(sampler, "sampler"));
    KVPLAN_RETURN_IF_ERROR(NotNull(logits, "logits"));
    KVPLAN_RETURN_IF_ERROR(NotNull(token, "token"));
    if (vocab_size <= 0) return absl::InvalidArgumentError(absl::StrCat("vocab_size is ", vocab_size));
    KVPLAN_ASSIGN_OR_RETURN(*token, sampler->sampler.Sample(std::span<const float>(logits, size_t(vocab_size))));
    return absl::OkStatus();
  });
}

}  // extern "C"
