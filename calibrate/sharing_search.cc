#include "calibrate/sharing_search.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <set>
#include <utility>

#include "base/status_macros.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {
namespace {

// Captures the final hidden states of a candidate model.
class HiddenObserver : public ForwardObserver {
 public:
  void OnLayerKv(int, int, const float*, const float*, const float*, const float*) override {}
  bool WantsLayerKv() const override { return false; }
  void OnFinalHidden(int rows, const float* hidden) override {
    hidden_.insert(hidden_.end(), hidden, hidden + rows * dim_);
  }
  explicit HiddenObserver(int dim) : dim_(dim) {}
  std::vector<float> hidden_;

 private:
  int64_t dim_;
};

double MeanCosine(const std::vector<float>& a, const std::vector<float>& b, int dim) {
  double total = 0;
  const int64_t rows = int64_t(a.size()) / dim;
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0, na = 0, nb = 0;
    for (int d = 0; d < dim; ++d) {
      const double x = a[r * dim + d], y = b[r * dim + d];
      dot += x * y;
      na += x * x;
      nb += y * y;
    }
    total += dot / std::sqrt(std::max(na * nb, 1e-30));
  }
  return total / std::max<int64_t>(rows, 1);
}

absl::Status RunSequences(Model& model, const std::vector<std::vector<int32_t>>& sequences) {
  for (const auto& sequence : sequences) {
    model.Reset();
    KVPLAN_RETURN_IF_ERROR(model.Forward(SequenceRows(sequence, 0, 0), LogitRows::kLastPerSequence).status());
  }
  return absl::OkStatus();
}

struct LayerPair {
  int donor, layer;
  float distance;  // between the layers' mean keys and values
};

// Every pair of layers, most dissimilar first.
std::vector<LayerPair> PairsByDistance(const StatisticsObserver& statistics, int layers, int64_t tokens) {
  std::vector<std::vector<float>> means(layers);
  for (int l = 0; l < layers; ++l) means[l] = statistics.LayerMean(l, tokens);
  std::vector<LayerPair> pairs;
  for (int i = 0; i < layers; ++i)
    for (int j = i + 1; j < layers; ++j) {
      double distance = 0;
      for (size_t d = 0; d < means[i].size(); ++d)
        distance += double(means[i][d] - means[j][d]) * (means[i][d] - means[j][d]);
      pairs.push_back({i, j, float(std::sqrt(distance))});
    }
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const LayerPair& a, const LayerPair& b) { return a.distance > b.distance; });
  return pairs;
}

}  // namespace

absl::StatusOr<plan::LayerSharing> SearchSharing(const CalibrateOptions& options, CalibrationSession& session,
                                                 const plan::ModelFingerprint& fingerprint,
                                                 const std::vector<std::vector<int32_t>>& sequences,
                                                 const StatisticsObserver& statistics, int64_t tokens,
                                                 StageClock& clock) {
  const ModelConfig& config = session.config();
  const int limit = options.max_shared_layers >= 0 ? options.max_shared_layers : config.num_layers / 3;
  const std::vector<LayerPair> pairs = PairsByDistance(statistics, config.num_layers, tokens);

  clock.Progress("layer sharing search", 0, int64_t(pairs.size()));
  KVPLAN_ASSIGN_OR_RETURN(Model * model, session.Runtime());
  HiddenObserver observer(config.hidden_size);
  session.Observe(&observer);
  CalibrationReport& report = clock.report();
  plan::LayerSharing sharing;
  sharing.set_cosine_threshold(options.share_cosine_threshold);
  std::set<int> sharers, donors;
  int tried = 0;
  double candidate_seconds = 0;
  for (const LayerPair& pair : pairs) {
    clock.Progress("layer sharing search", ++tried, int64_t(pairs.size()));
    if (int(sharers.size()) >= limit) break;
    // A sharer stores nothing, so it cannot donate; a donor must keep its own cache.
    if (sharers.contains(pair.layer) || sharers.contains(pair.donor) || donors.contains(pair.layer)) continue;
    plan::Plan candidate;
    *candidate.mutable_model() = fingerprint;
    *candidate.mutable_sharing() = sharing;
    auto* share = candidate.mutable_sharing()->add_shares();
    share->set_layer(pair.layer);
    share->set_donor(pair.donor);
    const auto start = std::chrono::steady_clock::now();
    KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(candidate, config, session.weights()));
    KVPLAN_RETURN_IF_ERROR(model->UsePolicies(std::make_shared<const PlanPolicies>(std::move(policies))));
    observer.hidden_.clear();
    KVPLAN_RETURN_IF_ERROR(RunSequences(*model, sequences));
    candidate_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++report.share_candidates;
    const double cosine = MeanCosine(observer.hidden_, statistics.hidden(), config.hidden_size);
    if (cosine < options.share_cosine_threshold) continue;
    share->set_layer_distance(pair.distance);
    share->set_hidden_cosine(float(cosine));
    sharing = candidate.sharing();
    sharers.insert(pair.layer);
    donors.insert(pair.donor);
  }
  if (report.share_candidates > 0) report.seconds_per_share_candidate = candidate_seconds / report.share_candidates;
  session.Observe(nullptr);
  return sharing;
}

}  // namespace kvplan
