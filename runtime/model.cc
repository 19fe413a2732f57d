#include "runtime/model.h"

#include <numeric>

namespace kvplan {

StepRows SequenceRows(const std::vector<int32_t>& tokens, int sequence, int first_position) {
  StepRows rows;
  rows.tokens = tokens;
  rows.sequences.assign(tokens.size(), sequence);
  rows.positions.resize(tokens.size());
  std::iota(rows.positions.begin(), rows.positions.end(), first_position);
  return rows;
}

}  // namespace kvplan
