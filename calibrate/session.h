// What the stages of a calibration run over: one opened model, its calibration sequences and the runtime model
// their forward passes run on (the session), and the clock that times the stages of one calibration.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "calibrate/calibrate.h"
#include "loader/open_model.h"
#include "runtime/model.h"

namespace kvplan {

// Times the stages of a calibration, reports their progress and samples the device memory in use.
class StageClock {
 public:
  StageClock(const CalibrationProgress& progress, CalibrationReport& report, bool on_device);
  ~StageClock() { Finish(); }
  StageClock(const StageClock&) = delete;
  StageClock& operator=(const StageClock&) = delete;

  void Progress(const std::string& stage, int64_t done, int64_t total);
  // Ends the current stage.
  void Finish();
  CalibrationReport& report() { return report_; }

 private:
  CalibrationProgress progress_;  // a copy: callers pass temporaries (nullptr, lambdas)
  CalibrationReport& report_;
  bool on_device_;
  std::string stage_;
  std::chrono::steady_clock::time_point start_;
};

// `kvplan calibrate` opens one session for its calibration; `kvplan sweep` opens one and calibrates every point
// over it, so the checkpoint is opened and the data tokenized once.
class CalibrationSession {
 public:
  // Opens options.model_dir (or builds options.model_shape with random weights) and takes the calibration
  // sequences: whole sequence_length pieces of options.data_path, or random token ids (random_tokens). Reported
  // to `clock` as the stage "loading the model".
  static absl::StatusOr<std::unique_ptr<CalibrationSession>> Open(const CalibrateOptions& options, StageClock& clock);
  ~CalibrationSession();

  // Whether `options` read the model and data this session opened, and run where it does.
  bool Serves(const CalibrateOptions& options) const;

  const LoadedModel& model() const { return model_; }
  const ModelConfig& config() const { return model_.config; }
  const WeightSource& weights() const { return *model_.weights; }
  const std::vector<std::vector<int32_t>>& sequences() const { return sequences_; }
  int sequence_length() const { return source_.sequence_length; }
  int64_t tokens() const { return int64_t(sequences_.size()) * source_.sequence_length; }
  bool random_tokens() const { return source_.random_tokens; }
  // Where forward passes and dictionary training run: the GPU, or the CPU.
  bool on_device() const { return on_device_; }

  // The model forward passes run on: the full cache of one sequence, built on first use and shown to the
  // observer Observe last named (none at first).
  absl::StatusOr<Model*> Runtime();
  void Observe(ForwardObserver* observer);
  // Gives the runtime model and its device memory back, and forgets the observer: before dictionary training,
  // which wants the memory, and whenever a calibration ends, so that every calibration builds its own, as one
  // `kvplan calibrate` does.
  void ReleaseRuntime();

 private:
  class StageObserver;
  CalibrationSession(const CalibrateOptions& options, LoadedModel model);

  CalibrateOptions source_;  // the options it was opened with
  bool on_device_;
  LoadedModel model_;
  std::vector<std::vector<int32_t>> sequences_;
  std::unique_ptr<StageObserver> observer_;
  std::unique_ptr<Model> runtime_;
};

}  // namespace kvplan
