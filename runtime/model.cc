#include "runtime/model.h"

#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvplan {

StepRows SequenceRows(const std::vector<int32_t>& tokens, int sequence, int first_position) {
  StepRows rows;
  rows.tokens = tokens;
  rows.sequences.assign(tokens.size(), sequence);
  rows.positions.resize(tokens.size());
  std::iota(rows.positions.begin(), rows.positions.end(), first_position);
  return rows;
}

absl::Status CheckSequence(int sequence, int num_sequences) {
  if (sequence < 0 || sequence >= num_sequences)
    return absl::OutOfRangeError(absl::StrCat("sequence ", sequence, " outside [0, ", num_sequences, ")"));
  return absl::OkStatus();
}

absl::Status ValidateStepRows(const StepRows& rows, const ModelConfig& config, const std::vector<int32_t>& lengths,
                              int capacity) {
  const size_t T = rows.tokens.size();
  if (T == 0 || rows.sequences.size() != T || rows.positions.size() != T)
    return absl::InvalidArgumentError("StepRows: tokens, sequences and positions must have the same non-zero size");
  std::vector<int32_t> next = lengths;
  std::vector<bool> finished(lengths.size(), false);  // a sequence whose rows already ended in this step
  for (size_t t = 0; t < T; ++t) {
    if (rows.tokens[t] < 0 || rows.tokens[t] >= config.vocab_size)
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", rows.tokens[t], " outside vocabulary of ", config.vocab_size));
    const int s = rows.sequences[t];
    if (s < 0 || s >= int(lengths.size()))
      return absl::InvalidArgumentError(absl::StrCat("sequence ", s, " outside [0, ", lengths.size(), ")"));
    if (finished[s]) return absl::InvalidArgumentError(absl::StrCat("rows of sequence ", s, " are not consecutive"));
    if (t + 1 < T && rows.sequences[t + 1] != s) finished[s] = true;
    if (rows.positions[t] != next[s])
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s, " expects position ", next[s], ", got ", rows.positions[t]));
    if (rows.positions[t] >= capacity)
      return absl::OutOfRangeError(
          absl::StrCat("position ", rows.positions[t], " exceeds the KV cache capacity ", capacity));
    ++next[s];
  }
  return absl::OkStatus();
}

std::vector<int> ChunkRows(const StepRows& rows, int max_rows_per_sequence) {
  const int total = int(rows.tokens.size());
  std::vector<int> bounds = {0};
  if (max_rows_per_sequence <= 0) {
    bounds.push_back(total);
    return bounds;
  }
  // Rows of a sequence are consecutive, so a pass only needs the run length of the current sequence.
  int run = 0;
  for (int r = 0; r < total; ++r) {
    run = r > bounds.back() && rows.sequences[r] == rows.sequences[r - 1] ? run + 1 : 1;
    if (run > max_rows_per_sequence) {
      bounds.push_back(r);
      run = 1;
    }
  }
  bounds.push_back(total);
  return bounds;
}

}  // namespace kvplan
