#include "calibrate/session.h"

#include <algorithm>
#include <random>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "runtime/backend.h"

namespace kvplan {
namespace {

// Uniformly random token ids: calibration text for a random-weight shape.
std::vector<std::vector<int32_t>> RandomSequences(int vocab_size, int count, int length) {
  std::mt19937 generator(5);
  std::uniform_int_distribution<int32_t> token(0, vocab_size - 1);
  std::vector<std::vector<int32_t>> sequences(count, std::vector<int32_t>(length));
  for (auto& sequence : sequences)
    for (int32_t& id : sequence) id = token(generator);
  return sequences;
}

// The calibration sequences: whole sequence_length pieces of the tokenized data.
absl::StatusOr<std::vector<std::vector<int32_t>>> DataSequences(const CalibrateOptions& options,
                                                                const LoadedModel& model) {
  KVPLAN_ASSIGN_OR_RETURN(const std::vector<int32_t> stream,
                          model.EncodeDataFile(options.data_path, int64_t(options.sequences) * options.sequence_length));
  if (int64_t(stream.size()) < options.sequence_length)
    return absl::InvalidArgumentError(absl::StrCat(options.data_path, " holds ", stream.size(),
                                                   " tokens; calibration needs at least ", options.sequence_length));
  std::vector<std::vector<int32_t>> sequences;
  for (int64_t begin = 0; begin + options.sequence_length <= int64_t(stream.size()); begin += options.sequence_length)
    sequences.emplace_back(stream.begin() + begin, stream.begin() + begin + options.sequence_length);
  return sequences;
}

}  // namespace

StageClock::StageClock(const CalibrationProgress& progress, CalibrationReport& report, bool on_device)
    : progress_(progress), report_(report), on_device_(on_device) {}

void StageClock::Progress(const std::string& stage, int64_t done, int64_t total) {
  if (stage != stage_) {
    Finish();
    stage_ = stage;
    start_ = std::chrono::steady_clock::now();
  }
  if (on_device_) report_.peak_device_bytes = std::max(report_.peak_device_bytes, DeviceBytesInUse());
  if (progress_) progress_(stage, done, total);
}

void StageClock::Finish() {
  if (stage_.empty()) return;
  report_.stage_seconds.emplace_back(stage_,
                                     std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  stage_.clear();
}

// Forwards to the observer the current stage needs, so one runtime model serves every stage.
class CalibrationSession::StageObserver : public ForwardObserver {
 public:
  void OnLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope,
                 const float* v) override {
    if (target != nullptr) target->OnLayerKv(layer, rows, q, k, k_pre_rope, v);
  }
  void OnFinalHidden(int rows, const float* hidden) override {
    if (target != nullptr) target->OnFinalHidden(rows, hidden);
  }
  bool OnDeviceLayerKv(int layer, int rows, const float* q, const float* k, const float* k_pre_rope, const float* v,
                       void* stream) override {
    return target != nullptr && target->OnDeviceLayerKv(layer, rows, q, k, k_pre_rope, v, stream);
  }
  bool WantsLayerKv() const override { return target != nullptr && target->WantsLayerKv(); }
  ForwardObserver* target = nullptr;
};

CalibrationSession::CalibrationSession(const CalibrateOptions& options, LoadedModel model)
    : source_(options),
      on_device_(ResolveBackend(options.device) == Backend::kCuda),
      model_(std::move(model)),
      observer_(std::make_unique<StageObserver>()) {}

CalibrationSession::~CalibrationSession() = default;

absl::StatusOr<std::unique_ptr<CalibrationSession>> CalibrationSession::Open(const CalibrateOptions& options,
                                                                             StageClock& clock) {
  clock.Progress("loading the model", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(LoadedModel model, options.model_shape.empty() ? OpenModel(options.model_dir)
                                                                         : RandomModel(options.model_shape, 1));
  std::unique_ptr<CalibrationSession> session(new CalibrationSession(options, std::move(model)));
  if (options.random_tokens) {
    session->sequences_ = RandomSequences(session->config().vocab_size, options.sequences, options.sequence_length);
  } else {
    KVPLAN_ASSIGN_OR_RETURN(session->sequences_, DataSequences(options, session->model_));
  }
  clock.Progress("loading the model", 1, 1);
  return session;
}

bool CalibrationSession::Serves(const CalibrateOptions& options) const {
  return options.model_dir == source_.model_dir && options.model_shape == source_.model_shape &&
         options.random_tokens == source_.random_tokens && options.data_path == source_.data_path &&
         options.sequences == source_.sequences && options.sequence_length == source_.sequence_length &&
         options.device == source_.device;
}

absl::StatusOr<Model*> CalibrationSession::Runtime() {
  if (runtime_ == nullptr) {
    KVPLAN_ASSIGN_OR_RETURN(runtime_, CreateModel(config(), weights(),
                                                  {.backend = source_.device,
                                                   .capacity = source_.sequence_length,
                                                   .max_rows = source_.sequence_length,
                                                   .observer = observer_.get()}));
  }
  return runtime_.get();
}

void CalibrationSession::Observe(ForwardObserver* observer) { observer_->target = observer; }

void CalibrationSession::ReleaseRuntime() {
  runtime_.reset();
  observer_->target = nullptr;
}

}  // namespace kvplan
