// Generates text through kvplan's C++ runtime:
//   cpp_generate MODEL_DIR PROMPT [NEW_TOKENS [PLAN]]
// prints the prompt and its greedy continuation, then a line with the device and the KV cache's bytes.
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "base/build_info.h"
#include "loader/open_model.h"
#include "loader/tokenizer.h"
#include "plans/plan_io.h"
#include "runtime/backend.h"
#include "runtime/sampling.h"

namespace {

absl::Status Generate(const std::string& model_dir, const std::string& text, int new_tokens,
                      const std::string& plan_path) {
  absl::StatusOr<kvplan::LoadedModel> loaded = kvplan::OpenModel(model_dir);
  if (!loaded.ok()) return loaded.status();
  std::optional<kvplan::plan::Plan> plan;
  if (!plan_path.empty()) {
    absl::StatusOr<kvplan::plan::Plan> read = kvplan::ReadPlanFile(plan_path);
    if (!read.ok()) return read.status();
    plan = *std::move(read);
  }

  const std::vector<int32_t> prompt = loaded->EncodePrompt(text);
  const int capacity = int(prompt.size()) + new_tokens;
  absl::StatusOr<std::unique_ptr<kvplan::Model>> model = kvplan::CreateModel(
      loaded->config, *loaded->weights, {.capacity = capacity, .max_rows = capacity, .plan = plan ? &*plan : nullptr});
  if (!model.ok()) return model.status();
  absl::StatusOr<kvplan::Sampler> sampler = kvplan::Sampler::Create({.temperature = 0});
  if (!sampler.ok()) return sampler.status();

  std::vector<int32_t> generated;
  absl::StatusOr<std::vector<float>> logits =
      (*model)->Forward(kvplan::SequenceRows(prompt, 0, 0), kvplan::LogitRows::kLastPerSequence);
  for (int i = 0; i < new_tokens && logits.ok(); ++i) {
    absl::StatusOr<int32_t> next = sampler->Sample(*logits);
    if (!next.ok()) return next.status();
    if (*next == loaded->config.eos_token_id) break;
    generated.push_back(*next);
    logits = (*model)->Forward(kvplan::SequenceRows({*next}, 0, int(prompt.size() + generated.size()) - 1),
                               kvplan::LogitRows::kLastPerSequence);
  }
  if (!logits.ok()) return logits.status();
  std::printf("%s%s\nkvplan %s on %s: %zu prompt + %zu new tokens, KV cache %lld bytes\n", text.c_str(),
              loaded->tokenizer->Decode(generated).c_str(), kvplan::kKvplanVersion, (*model)->device_name().c_str(),
              prompt.size(), generated.size(), (long long)(*model)->kv_cache_bytes());
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR PROMPT [NEW_TOKENS [PLAN]]\n", argv[0]);
    return 2;
  }
  const int new_tokens = argc > 3 ? std::atoi(argv[3]) : 16;
  if (new_tokens <= 0) {
    std::fprintf(stderr, "NEW_TOKENS must be positive\n");
    return 2;
  }
  const absl::Status status = Generate(argv[1], argv[2], new_tokens, argc > 4 ? argv[4] : "");
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
