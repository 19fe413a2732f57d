// The check both runtimes' ResetSequence tests run: two sequences decode; one is reset and takes a new prompt in
// the same step the other decodes in (as a serving loop does), then both decode on. The reset sequence must match
// a sequence that never held anything, the other one a sequence whose neighbour was never reset.
//
// Both come from one reference model that runs every step with the same rows as the model under test: its
// sequence 2, unused until the reset, takes the new prompt where the tested model's reset sequence 0 does. So the
// two models multiply matrices of the same shapes (BLAS and cuBLAS pick their kernels, blocking and summation order
// by shape, so a row's result depends only on the shapes and on that row), and any difference left is the reset's
// doing. Comparing with models of other batch sizes instead measured rounding differences of differently blocked
// GEMMs, which attention-scored eviction can turn into another token evicted.
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
  std::unique_ptr<Model> batched = make(2), reference = make(3);
  ASSERT_TRUE(batched && reference) << name;
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
  // Both models take every step: the tested model's sequence `renewed` is the reference's `fresh` once reset.
  auto both_forward = [&](const StepRows& rows, int renewed, int fresh) {
    StepRows reference_rows = rows;
    for (int32_t& sequence : reference_rows.sequences)
      if (sequence == renewed) sequence = fresh;
    std::vector<float> expected = forward(*reference, reference_rows);
    return std::make_pair(forward(*batched, rows), std::move(expected));
  };
  // One row each for sequence 0 (at `first`) and sequence 1 (at `second`).
  auto decode_rows = [&](int first, int second) {
    return StepRows{{next_token(first), next_token(second)}, {0, 1}, {first, second}};
  };

  forward(*batched, SequenceRows(old_prompt, 0, 0));
  forward(*reference, SequenceRows(old_prompt, 0, 0));
  both_forward(SequenceRows(other, 1, 0), 0, 0);
  int old_length = int(old_prompt.size()), other_length = int(other.size());
  for (int step = 0; step < 4; ++step) both_forward(decode_rows(old_length++, other_length++), 0, 0);

  ASSERT_TRUE(batched->ResetSequence(0).ok()) << name;
  EXPECT_EQ(batched->ResetSequence(2).code(), absl::StatusCode::kOutOfRange) << name;
  StepRows joining = SequenceRows(new_prompt, 0, 0);
  joining.tokens.push_back(next_token(other_length));
  joining.sequences.push_back(1);
  joining.positions.push_back(other_length++);
  auto [logits, expected] = both_forward(joining, 0, 2);
  int new_length = int(new_prompt.size());
  for (int step = 0;; ++step) {
    EXPECT_LE(RelativeError(logits.data(), expected.data(), vocab), tolerance)
        << name << ", reset sequence, step " << step;
    EXPECT_LE(RelativeError(logits.data() + vocab, expected.data() + vocab, vocab), tolerance)
        << name << ", other sequence, step " << step;
    if (step == 4) break;
    std::tie(logits, expected) = both_forward(decode_rows(new_length++, other_length++), 0, 2);
  }
  // The reference's sequence 0 still holds the old prompt: without it, both hold the same entries.
  ASSERT_TRUE(reference->ResetSequence(0).ok()) << name;
  EXPECT_EQ(batched->kv_cache_bytes(), reference->kv_cache_bytes()) << name;
}

}  // namespace kvplan::testing
