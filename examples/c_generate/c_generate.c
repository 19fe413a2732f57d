/* Generates text through kvplan's C API:
 *   c_generate MODEL_DIR PROMPT [NEW_TOKENS [PLAN [TEMPERATURE]]]
 * prints the prompt and its continuation, then a line with the device and the KV cache's bytes. */
#include <stdio.h>
#include <stdlib.h>

#include "capi/kvplan.h"

/* Prints the failed call's message and leaves. */
static void Check(kvplan_status status) {
  if (status == KVPLAN_OK) return;
  fprintf(stderr, "error %d: %s\n", (int)status, kvplan_last_error());
  exit(1);
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL_DIR PROMPT [NEW_TOKENS [PLAN [TEMPERATURE]]]\n", argv[0]);
    return 2;
  }
  const int new_tokens = argc > 3 ? atoi(argv[3]) : 16;
  const char* plan_path = argc > 4 && argv[4][0] != '\0' ? argv[4] : NULL;
  const float temperature = argc > 5 ? (float)atof(argv[5]) : 0.0f;
  if (new_tokens <= 0) {
    fprintf(stderr, "NEW_TOKENS must be positive\n");
    return 2;
  }

  kvplan_model* model = NULL;
  Check(kvplan_model_open(argv[1], &model));
  kvplan_plan* plan = NULL;
  if (plan_path != NULL) Check(kvplan_plan_open(model, plan_path, &plan));

  size_t prompt_length = 0;
  kvplan_status status = kvplan_tokenize(model, argv[2], 1, NULL, 0, &prompt_length);
  if (status != KVPLAN_OUT_OF_RANGE) Check(status);
  int32_t* tokens = malloc((prompt_length + (size_t)new_tokens) * sizeof(int32_t));
  Check(kvplan_tokenize(model, argv[2], 1, tokens, prompt_length, &prompt_length));

  kvplan_cache* cache = NULL;
  Check(kvplan_cache_create(model, plan, 1, (int32_t)(prompt_length + (size_t)new_tokens), KVPLAN_DEVICE_AUTO, &cache));
  kvplan_sampler* sampler = NULL;
  Check(kvplan_sampler_create(temperature, 40, 0.95f, 1234, &sampler));

  const int32_t vocab = kvplan_model_vocab_size(model);
  float* logits = malloc((size_t)vocab * sizeof(float));
  Check(kvplan_prefill(cache, 0, tokens, prompt_length, logits));
  size_t length = prompt_length;
  const int32_t sequence = 0;
  for (int i = 0; i < new_tokens; ++i) {
    Check(kvplan_sample(sampler, logits, vocab, &tokens[length]));
    if (tokens[length] == kvplan_model_eos_token(model)) break;
    ++length;
    if (i + 1 < new_tokens) Check(kvplan_decode(cache, &sequence, &tokens[length - 1], 1, logits));
  }

  /* The text after the BOS token. */
  const size_t first = kvplan_model_bos_token(model) >= 0 ? 1 : 0;
  size_t text_length = 0;
  status = kvplan_detokenize(model, tokens + first, length - first, NULL, 0, &text_length);
  if (status != KVPLAN_OUT_OF_RANGE) Check(status);
  char* text = malloc(text_length + 1);
  Check(kvplan_detokenize(model, tokens + first, length - first, text, text_length + 1, &text_length));
  printf("%s\n", text);
  printf("kvplan %s on %s: %zu prompt + %zu new tokens, KV cache %lld bytes\n", kvplan_version(),
         kvplan_cache_device_name(cache), prompt_length, length - prompt_length, (long long)kvplan_cache_bytes(cache));

  free(text);
  free(logits);
  free(tokens);
  kvplan_sampler_free(sampler);
  kvplan_cache_free(cache);
  kvplan_plan_free(plan);
  kvplan_model_free(model);
  return 0;
}
