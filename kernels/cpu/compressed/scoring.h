// CPU oracles of the scoring kernels (kernels/cuda/compressed/scoring.cu): attention-scored budgets and RefreshKV's
// decision and selection, acting on the arrays of kernels/compressed_layout.h as the CUDA kernels of the same name do.
#pragma once

#include "kernels/compressed_layout.h"

namespace kvplan::cpu {

// Attention scoring: every live entry of a stepping head: score = score * decay + probability.
void update_scores(const CompressedLayer& layer, const StepRowsView& step, float decay,
                   const float* dense_probabilities, const float* coded_probabilities);

// RefreshKV, before the attention: a stepping sequence takes a full step when none has happened, when the stride
// is due (steps_since_refresh + 1 >= refresh_stride), or when the mean over query heads of its last row's query
// has cosine below the threshold to the last full step's. Writes full_step and step_query.
void refresh_decide(const RefreshStateView& state, const StepRowsView& step, const RefreshSettings& settings,
                    const float* q, int heads, int head_dim);

// RefreshKV, after the attention: on a full step every head of the sequence selects min(targets.selected, live)
// entries, the highest probabilities after max-pooling each entry's over the entries within pool_kernel / 2
// positions of it, ties to the newer position; the sequence's refresh_position becomes its length and its query
// the step's. Otherwise steps_since_refresh grows.
void refresh_select(const CompressedLayer& layer, const RefreshStateView& state, const StepRowsView& step,
                    const StepTargets& targets, const RefreshSettings& settings, const float* dense_probabilities,
                    const float* coded_probabilities);

}  // namespace kvplan::cpu
