// Offline calibration: runs the model on sample text, learns what each selected method needs (KVSharer layer
// pairs, CSR dictionaries, attention coverage for token budgets, RefreshKV settings) and compiles a plan. The
// work is done by stages over one opened session (calibrate/session.h): statistics, the sharing search,
// dictionary training, the optimiser's measurements and the plan's verification, each in a file of its own.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "calibrate/methods.h"
#include "planner/planner.h"
#include "plans/kvplan.pb.h"
#include "runtime/backend.h"

namespace kvplan {

struct CalibrateOptions {
  std::string model_dir;
  std::string data_path;
  // Instead of a checkpoint and data: a named real shape with random weights (loader's RandomModel, seed 1, as
  // `kvplan bench --shape` builds it). Such a model has nothing to learn from, so its plan is synthetic: random
  // unit atoms for CSR, the same attention coverage for every head, no layer sharing; it exercises the runtime
  // at real scale, not quality.
  std::string model_shape;
  // With model_shape: calibrate for real on uniformly random token ids instead, to measure calibration's time
  // and memory at that scale.
  bool random_tokens = false;
  // Where forward passes, the sharing search and dictionary training run; auto prefers the GPU.
  Backend device = Backend::kAuto;
  float target_memory_ratio = 0.2f;
  int reference_context = 0;  // the context the target is met at; 0: min(max positions, 2048)
  // Also quant (KIVI-style quantization) and optimise (quantization and budgets chosen per layer by measured loss).
  CalibrationMethods methods = {CalibrationMethod::kShare, CalibrationMethod::kDict, CalibrationMethod::kBudget,
                                CalibrationMethod::kRefresh};
  int sequences = 16;
  int sequence_length = 512;
  // KVSharer: accept a share while the last hidden state's cosine to the full model stays >= threshold.
  float share_cosine_threshold = 0.95f;
  int max_shared_layers = -1;  // -1: a third of the layers
  int share_sequences = 4;     // calibration sequences each sharing candidate is judged on
  // CSR dictionaries.
  int dictionary_atoms = 1024;
  int key_sparsity = 8;
  int value_sparsity = 8;
  int coding_recent_window = 64;
  // Learn key dictionaries on keys after RoPE (attention then meets coded keys through one query . dictionary
  // table per step) instead of before it, as the CSR paper does.
  bool keys_after_rope = false;
  int dictionary_epochs = 6;
  int max_training_vectors = 16384;  // per layer, for keys and for values
  // Quantization (method quant; a layer is sparse-coded or quantized, not both).
  int key_bits = 4;
  int value_bits = 4;
  int quantization_recent_window = 64;
  BudgetSettings budget_settings;
  RefreshPolicy refresh_policy;
  // The quality optimiser (method optimise): each layer's loss is measured for every combination of these
  // quantization widths (and bf16) and budget fractions (and 1) on the first optimiser_sequences calibration
  // sequences, the planner picks the mix that meets the target at the least summed loss, and the plan is verified
  // on the last verify_sequences sequences. Budgets follow budget_settings.policy; quantization's window is
  // quantization_recent_window.
  std::vector<int> optimiser_widths = {8, 4, 2};
  std::vector<float> optimiser_keep_fractions = {0.5f, 0.25f, 0.125f};
  int optimiser_sequences = 2;
  int verify_sequences = 2;
  // Retrieval probes (calibration text with a hidden pass key, scored only where the answer is predicted) added to
  // the measurements and the verification; a setting's loss is its text KL + retrieval_weight * its probe KL.
  int retrieval_probes = 4;
  float retrieval_weight = 0.05f;
};

// Called with (stage, done, total).
using CalibrationProgress = std::function<void(const std::string&, int64_t, int64_t)>;

// What a calibration cost.
struct CalibrationReport {
  std::string device;                                         // the runtime the forward passes ran on
  std::vector<std::pair<std::string, double>> stage_seconds;  // in order
  int share_candidates = 0;                                   // sharing candidates run through the model
  double seconds_per_share_candidate = 0;
  int64_t peak_device_bytes = 0;  // device memory in use at its highest (sampled at each progress step); 0 on CPU
};

class CalibrationSession;

// Opens a session for `options` (the stage "loading the model") and calibrates over it; a random-weight shape
// without random_tokens gets its synthetic plan without one.
absl::StatusOr<plan::Plan> Calibrate(const CalibrateOptions& options, const CalibrationProgress& progress = nullptr,
                                     CalibrationReport* report = nullptr);
// Calibrates over a session opened for the same model, data and device (CalibrationSession::Serves), as
// `kvplan sweep` does for each of its points: the plan is the one Calibrate(options) writes. The report's stages
// start after the loading.
absl::StatusOr<plan::Plan> Calibrate(const CalibrateOptions& options, CalibrationSession& session,
                                     const CalibrationProgress& progress = nullptr,
                                     CalibrationReport* report = nullptr);

}  // namespace kvplan
