/* kvplan's C API: load a model and a cache plan checked against it, then prefill, decode and sample over a batch
 * of sequences, from C or any language with a C FFI. Plain C99: opaque handles, fixed-width integers, no C++ types.
 *
 * Errors: every function that can fail returns a kvplan_status; on anything but KVPLAN_OK, kvplan_last_error()
 * gives this thread's message naming the problem (valid until the thread's next failing call). Handles are owned
 * by the caller and freed with their kvplan_*_free function (NULL is accepted). A handle may be used by one thread
 * at a time; distinct handles may be used from distinct threads.
 *
 * Link libkvplan (CMake: find_package(kvplan) and kvplan::capi; pkg-config: kvplan). Do not link it together with
 * kvplan::runtime into one program: both register kvplan's plan schema with protobuf. */
#ifndef KVPLAN_CAPI_KVPLAN_H_
#define KVPLAN_CAPI_KVPLAN_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped when a function's signature or meaning changes; new functions keep it. */
#define KVPLAN_C_API_VERSION 1

#if defined(__GNUC__)
#define KVPLAN_API __attribute__((visibility("default")))
#else
#define KVPLAN_API
#endif

typedef enum kvplan_status {
  KVPLAN_OK = 0,
  KVPLAN_INVALID_ARGUMENT = 1,    /* a bad value or a NULL pointer */
  KVPLAN_NOT_FOUND = 2,           /* a missing file */
  KVPLAN_FAILED_PRECONDITION = 3, /* e.g. a plan calibrated for another model, CUDA asked of a CPU build */
  KVPLAN_OUT_OF_RANGE = 4,        /* past a sequence's capacity, or an output buffer too small */
  KVPLAN_DATA_LOSS = 5,           /* a truncated or corrupt file */
  KVPLAN_UNIMPLEMENTED = 6,       /* a model or plan feature the runtime lacks */
  KVPLAN_INTERNAL = 7,            /* a device failure or a bug */
  KVPLAN_UNKNOWN = 8
} kvplan_status;

typedef enum kvplan_device {
  KVPLAN_DEVICE_AUTO = 0, /* CUDA when built with it, a device is present and it executes the plan */
  KVPLAN_DEVICE_CPU = 1,
  KVPLAN_DEVICE_CUDA = 2
} kvplan_device;

/* A model directory: config.json, safetensors weights and tokenizer.json. */
typedef struct kvplan_model kvplan_model;
/* A plan file, checked against the model it was opened with. */
typedef struct kvplan_plan kvplan_plan;
/* A runtime instance of a model: its weights on the device and the KV caches of a batch of sequences, full or
 * following a plan. Keeps each sequence's length. */
typedef struct kvplan_cache kvplan_cache;
/* Picks tokens from logits: greedy, or seeded draws at a temperature with top-k and top-p. */
typedef struct kvplan_sampler kvplan_sampler;

/* This thread's message for its last failed call; "" when none failed. */
KVPLAN_API const char* kvplan_last_error(void);
/* kvplan's version, e.g. "0.3.0", and the KVPLAN_C_API_VERSION the library was built with. */
KVPLAN_API const char* kvplan_version(void);
KVPLAN_API int32_t kvplan_c_api_version(void);

/* Opens `model_dir`. NOT_FOUND, DATA_LOSS, UNIMPLEMENTED or INVALID_ARGUMENT name the file and the problem. */
KVPLAN_API kvplan_status kvplan_model_open(const char* model_dir, kvplan_model** model);
KVPLAN_API void kvplan_model_free(kvplan_model* model);
KVPLAN_API int32_t kvplan_model_vocab_size(const kvplan_model* model);
/* max_position_embeddings: the longest sequence the model was trained for. */
KVPLAN_API int32_t kvplan_model_max_positions(const kvplan_model* model);
/* -1 when the model has none. */
KVPLAN_API int32_t kvplan_model_bos_token(const kvplan_model* model);
KVPLAN_API int32_t kvplan_model_eos_token(const kvplan_model* model);

/* Token ids of `text` (NUL-terminated UTF-8), after the BOS token when `add_bos` is nonzero and the model has one.
 * Sets *count to the number of ids; writes them when they fit in `capacity`, else returns OUT_OF_RANGE (call
 * with tokens NULL and capacity 0 to learn the count). */
KVPLAN_API kvplan_status kvplan_tokenize(const kvplan_model* model, const char* text, int32_t add_bos, int32_t* tokens,
                                         size_t capacity, size_t* count);
/* The text of `count` ids. Sets *length to its bytes without the terminating NUL; writes it, NUL-terminated, when
 * length + 1 <= capacity, else returns OUT_OF_RANGE. INVALID_ARGUMENT for an id outside the vocabulary. */
KVPLAN_API kvplan_status kvplan_detokenize(const kvplan_model* model, const int32_t* tokens, size_t count, char* text,
                                           size_t capacity, size_t* length);

/* Reads `plan_path` and runs every check the runtime makes before executing it: the file's integrity and format
 * version (DATA_LOSS, FAILED_PRECONDITION), its structure (INVALID_ARGUMENT) and that it was calibrated for exactly
 * this model (FAILED_PRECONDITION, naming what differs). The plan does not keep `model`. */
KVPLAN_API kvplan_status kvplan_plan_open(const kvplan_model* model, const char* plan_path, kvplan_plan** plan);
KVPLAN_API void kvplan_plan_free(kvplan_plan* plan);

/* A runtime for `num_sequences` sequences of up to `capacity` positions each (0: the model's
 * max_position_embeddings) on `device` (a kvplan_device), executing `plan` (NULL: the full cache; it must come from the
 * same model). The cache holds its own copies of the weights and the plan; `model` and `plan` may be freed after this
 * returns. OUT_OF_RANGE for a capacity past max_position_embeddings; FAILED_PRECONDITION for CUDA in a CPU-only build.
 */
KVPLAN_API kvplan_status kvplan_cache_create(const kvplan_model* model, const kvplan_plan* plan, int32_t num_sequences,
                                             int32_t capacity, int32_t device, kvplan_cache** cache);
KVPLAN_API void kvplan_cache_free(kvplan_cache* cache);
KVPLAN_API int32_t kvplan_cache_num_sequences(const kvplan_cache* cache);
KVPLAN_API int32_t kvplan_cache_capacity(const kvplan_cache* cache);
/* Positions `sequence` has processed; -1 for a sequence outside the batch. */
KVPLAN_API int32_t kvplan_cache_sequence_length(const kvplan_cache* cache, int32_t sequence);
/* Bytes all sequences' KV caches hold now (K/V counted as bf16, compressed entries at their packed size). */
KVPLAN_API int64_t kvplan_cache_bytes(const kvplan_cache* cache);
/* "cpu" or the GPU's name. */
KVPLAN_API const char* kvplan_cache_device_name(const kvplan_cache* cache);
/* Empties every sequence's cache. */
KVPLAN_API void kvplan_cache_reset(kvplan_cache* cache);
/* Empties one sequence's cache while the others keep theirs, so a serving loop can give the sequence to a new
 * request. OUT_OF_RANGE for a sequence outside the batch. */
KVPLAN_API kvplan_status kvplan_cache_reset_sequence(kvplan_cache* cache, int32_t sequence);

/* Feeds `count` (>= 1) tokens to `sequence`, continuing its cache, and writes the logits after the last of them to
 * `logits` ([vocab_size] floats; NULL: not wanted). OUT_OF_RANGE for a sequence outside the batch or past its
 * capacity. */
KVPLAN_API kvplan_status kvplan_prefill(kvplan_cache* cache, int32_t sequence, const int32_t* tokens, size_t count,
                                        float* logits);
/* One step for `count` distinct sequences at once: tokens[i] continues sequences[i]. Writes the logits of each,
 * in that order, to `logits` ([count, vocab_size] floats; NULL: not wanted). INVALID_ARGUMENT for a sequence given
 * twice, OUT_OF_RANGE for one outside the batch or at its capacity. */
KVPLAN_API kvplan_status kvplan_decode(kvplan_cache* cache, const int32_t* sequences, const int32_t* tokens,
                                       size_t count, float* logits);

/* temperature 0: greedy (the first most likely token); else a draw from softmax(logits / temperature) cut to the
 * `top_k` most likely tokens (0: all) and to the smallest set holding `top_p` (in (0, 1]) of the probability.
 * `seed` makes the draws reproducible. INVALID_ARGUMENT names a bad setting. Keep one sampler per sequence. */
KVPLAN_API kvplan_status kvplan_sampler_create(float temperature, int32_t top_k, float top_p, uint64_t seed,
                                               kvplan_sampler** sampler);
KVPLAN_API void kvplan_sampler_free(kvplan_sampler* sampler);
/* The token drawn from one row of `vocab_size` logits. */
KVPLAN_API kvplan_status kvplan_sample(kvplan_sampler* sampler, const float* logits, int32_t vocab_size,
                                       int32_t* token);

#ifdef __cplusplus
}
#endif

#endif /* KVPLAN_CAPI_KVPLAN_H_ */
