// The check both runtimes' ResetSequence tests run: two sequences decode; one is reset and takes a new prompt in
// the same step the other decodes in (as a serving loop does), then both decode on. The reset sequence must match
// a fresh model fed only the new prompt, the other one a model that never saw the reset.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model.h"
#include "tests/testing/test_util.h"

namespace kvplan::testing {

// make(num_sequences) builds the model under test; ids: at least 200 tokens.
inline void CheckResetSequence(const std::function<std::unique_ptr<Model>(int)>& make, const std::vector<int32_t>& ids,
                               double tolerance, const std::string& name) {
  std::unique_ptr<Model> batched = make(2), fresh = make(1), undisturbed = make(1);
  ASSERT_TRUE(batched && fresh && undisturbed) << name;
  const int vocab = batched->config().vocab_size;
  const std::vector<int32_t> old_prompt(ids.begin(), ids.begin() + 150), other(ids.begin() + 20, ids.begin() + 100);
  // Longer than kPlannedChunkRows, so the new prompt is chunked beside the other sequence's decode row.
  const std::vector<int32_t> new_prompt(ids.begin() + 50, ids.begin() + 190);
  auto next_token = [&](int position) { return ids[(position * 7) % ids.size()]; };
  auto forward = [&](Model& model, const StepRows& rows) {
    absl::StatusOr<std::vector<float>> logits = model.Forward(rows, LogitRows::kLastPerSequence);
    EXPECT_TRUE(logits.ok()) << name << ": " << logits.status();
    return logits.ok() ? *logits : std::vector<float>(rows.tokens.size() * vocab);
  };
  // One row each for sequence 0 (at `first`) and sequence 1 (at `second`).
  auto decode_rows = [&](int first, int second) {
    return StepRows{{next_token(first), next_token(second)}, {0, 1}, {first, second}};
  };

  forward(*batched, SequenceRows(old_prompt, 0, 0));
  forward(*batched, SequenceRows(other, 1, 0));
  forward(*undisturbed, SequenceRows(other, 0, 0));
  int old_length = int(old_prompt.size()), other_length = int(other.size());
  for (int step = 0; step < 4; ++step) {
    forward(*batched, decode_rows(old_length++, other_length));
    forward(*undisturbed, SequenceRows({next_token(other_length)}, 0, other_length));
    ++other_length;
  }

  ASSERT_TRUE(batched->ResetSequence(0).ok()) << name;
  EXPECT_EQ(batched->ResetSequence(2).code(), absl::StatusCode::kOutOfRange) << name;
  StepRows joining = SequenceRows(new_prompt, 0, 0);
  joining.tokens.push_back(next_token(other_length));
  joining.sequences.push_back(1);
  joining.positions.push_back(other_length);
  std::vector<float> both = forward(*batched, joining);
  std::vector<float> expected_new = forward(*fresh, SequenceRows(new_prompt, 0, 0));
  std::vector<float> expected_other = forward(*undisturbed, SequenceRows({next_token(other_length)}, 0, other_length));
  int new_length = int(new_prompt.size());
  ++other_length;
  for (int step = 0;; ++step) {
    EXPECT_LT(RelativeError(both.data(), expected_new.data(), vocab), tolerance)
        << name << ", reset sequence, step " << step;
    EXPECT_LT(RelativeError(both.data() + vocab, expected_other.data(), vocab), tolerance)
        << name << ", other sequence, step " << step;
    if (step == 4) break;
    both = forward(*batched, decode_rows(new_length, other_length));
    expected_new = forward(*fresh, SequenceRows({next_token(new_length)}, 0, new_length));
    expected_other = forward(*undisturbed, SequenceRows({next_token(other_length)}, 0, other_length));
    ++new_length;
    ++other_length;
  }
  EXPECT_EQ(batched->kv_cache_bytes(), fresh->kv_cache_bytes() + undisturbed->kv_cache_bytes()) << name;
}

}  // namespace kvplan::testing
