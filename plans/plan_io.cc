#include "plans/plan_io.h"

#include <cmath>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/atomic_file.h"
#include "base/hash.h"
#include "base/input_file.h"
#include "base/status_macros.h"
#include "plans/cache_policy.h"

namespace kvplan {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'P', 'L', 'A', 'N', '\0', '\0'};
constexpr size_t kHeaderSize = sizeof(kMagic) + 4 + 8 + 8;

template <typename T>
void Append(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

template <typename T>
T Load(const char* data) {
  T value;
  std::memcpy(&value, data, sizeof(value));
  return value;
}

absl::Status PlanError(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("invalid plan: ", message));
}

}  // namespace

std::string SerializePlanFile(const plan::Plan& plan) {
  plan::Plan versioned = plan;
  versioned.set_format_version(kPlanFormatVersion);
  std::string payload;
  versioned.SerializeToString(&payload);
  std::string out(kMagic, sizeof(kMagic));
  Append<uint32_t>(out, kPlanFormatVersion);
  Append<uint64_t>(out, payload.size());
  Append<uint64_t>(out, Fnv1a64(payload.data(), payload.size()));
  return out + payload;
}

absl::StatusOr<plan::Plan> ParsePlanFile(std::string_view bytes) {
  if (bytes.size() < kHeaderSize || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0)
    return absl::DataLossError("not a kvplan plan file (bad magic)");
  const uint32_t version = Load<uint32_t>(bytes.data() + 8);
  if (version != kPlanFormatVersion)
    return absl::FailedPreconditionError(absl::StrCat("plan format version ", version,
                                                      " is not supported by this kvplan (reads version ",
                                                      kPlanFormatVersion, "); calibrate the plan again"));
  const uint64_t length = Load<uint64_t>(bytes.data() + 12);
  const uint64_t checksum = Load<uint64_t>(bytes.data() + 20);
  if (length != bytes.size() - kHeaderSize)
    return absl::DataLossError(absl::StrCat("plan file truncated or padded: header says ", length,
                                            " payload bytes, file has ", bytes.size() - kHeaderSize));
  const std::string_view payload = bytes.substr(kHeaderSize);
  if (Fnv1a64(payload.data(), payload.size()) != checksum)
    return absl::DataLossError("plan file is corrupt (checksum mismatch)");
  plan::Plan plan;
  if (!plan.ParseFromArray(payload.data(), int(payload.size())))
    return absl::DataLossError("plan payload does not parse as kvplan.plan.Plan");
  if (plan.format_version() != version)
    return absl::DataLossError("plan payload and header disagree on the format version");
  KVPLAN_RETURN_IF_ERROR(ValidatePlanStructure(plan));
  return plan;
}

absl::Status WritePlanFile(const plan::Plan& plan, const std::string& path) {
  KVPLAN_RETURN_IF_ERROR(ValidatePlanStructure(plan));
  return WriteFileAtomically(path, SerializePlanFile(plan));
}

absl::StatusOr<plan::Plan> ReadPlanFile(const std::string& path) {
  KVPLAN_ASSIGN_OR_RETURN(const std::string bytes, ReadInputFile(path, "plan"));
  absl::StatusOr<plan::Plan> plan = ParsePlanFile(bytes);
  if (!plan.ok()) return absl::Status(plan.status().code(), absl::StrCat(path, ": ", plan.status().message()));
  return plan;
}

absl::Status ValidatePlanStructure(const plan::Plan& plan) {
  const plan::ModelFingerprint& model = plan.model();
  const int layers = model.num_layers(), kv_heads = model.num_kv_heads(), head_dim = model.head_dim();
  if (layers <= 0 || kv_heads <= 0 || head_dim <= 0) return PlanError("model fingerprint has no shape");
  auto layer_ok = [&](int layer) { return layer >= 0 && layer < layers; };

  std::set<int> sharers, donors;
  for (const auto& share : plan.sharing().shares()) {
    if (!layer_ok(share.layer()) || !layer_ok(share.donor()) || share.donor() >= share.layer())
      return PlanError(
          absl::StrCat("sharing ", share.layer(), " <- ", share.donor(), ": donor must be an earlier layer"));
    if (!sharers.insert(share.layer()).second) return PlanError(absl::StrCat("layer ", share.layer(), " shared twice"));
    donors.insert(share.donor());
  }
  for (int donor : donors)
    if (sharers.contains(donor)) return PlanError(absl::StrCat("layer ", donor, " is both a donor and a sharer"));

  const plan::SparseCoding& coding = plan.sparse_coding();
  if (coding.layers_size() > 0) {
    if (coding.key_sparsity() <= 0 || coding.value_sparsity() <= 0 || coding.recent_window() < 0)
      return PlanError("sparse coding needs positive sparsity and a non-negative recent window");
    for (const auto& entry : coding.layers()) {
      if (!layer_ok(entry.layer())) return PlanError(absl::StrCat("dictionary for layer ", entry.layer()));
      for (const plan::Dictionary* dictionary : {&entry.keys(), &entry.values()}) {
        if (dictionary->dim() != head_dim || dictionary->atoms() <= 0 || dictionary->atoms() > 65536 ||
            dictionary->values_size() != int64_t(dictionary->atoms()) * dictionary->dim())
          return PlanError(absl::StrCat("dictionary of layer ", entry.layer(), " has ", dictionary->values_size(),
                                        " values for ", dictionary->atoms(), " atoms of dim ", dictionary->dim(),
                                        " (head_dim ", head_dim, ")"));
      }
    }
  }

  const plan::KvQuantization& quantization = plan.quantization();
  if (quantization.recent_window() < 0) return PlanError("quantization needs a non-negative recent window");
  std::set<int> csr_layers, quantized_layers;
  for (const auto& entry : coding.layers()) csr_layers.insert(entry.layer());
  for (const auto& entry : quantization.layers()) {
    const int layer = entry.layer();
    if (!layer_ok(layer)) return PlanError(absl::StrCat("quantization for layer ", layer));
    if (!quantized_layers.insert(layer).second) return PlanError(absl::StrCat("layer ", layer, " quantized twice"));
    if (csr_layers.contains(layer))
      return PlanError(absl::StrCat("layer ", layer, " is both sparse-coded and quantized"));
    for (int bits : {entry.key_bits(), entry.value_bits()})
      if (!IsQuantizationWidth(bits) || (int64_t(head_dim) * bits) % 32 != 0)
        return PlanError(absl::StrCat("layer ", layer, " quantizes to ", bits, " bits (2, 4 or 8, head_dim * bits a ",
                                      "multiple of 32)"));
    if (entry.key_channel_scale_size() != int64_t(kv_heads) * head_dim)
      return PlanError(absl::StrCat("quantization of layer ", layer, " has ", entry.key_channel_scale_size(),
                                    " key channel scales for ", kv_heads, " KV heads of dim ", head_dim));
    for (float scale : entry.key_channel_scale())
      if (!(scale > 0.0f && std::isfinite(scale)))
        return PlanError(absl::StrCat("quantization of layer ", layer, " has key channel scale ", scale));
  }

  const plan::TokenBudgets& budgets = plan.budgets();
  for (const auto& layer : budgets.layers()) {
    if (!layer_ok(layer.layer()) || layer.head_keep_fraction_size() != kv_heads)
      return PlanError(absl::StrCat("budget for layer ", layer.layer(), " must list ", kv_heads, " KV heads"));
    for (float fraction : layer.head_keep_fraction())
      if (!(fraction > 0.0f && fraction <= 1.0f))
        return PlanError(absl::StrCat("budget fraction ", fraction, " of layer ", layer.layer(), " not in (0, 1]"));
  }
  if (budgets.layers_size() > 0 && budgets.scoring() == plan::TokenBudgets::SCORING_UNSPECIFIED)
    return PlanError("token budgets need a scoring method");

  const plan::RefreshSchedule& refresh = plan.refresh();
  if (refresh.layers_size() > 0) {
    if (!(refresh.small_cache_fraction() > 0 && refresh.small_cache_fraction() <= 1) || refresh.refresh_stride() <= 0)
      return PlanError("refresh needs a small-cache fraction in (0, 1] and a positive stride");
    for (int layer : refresh.layers())
      if (!layer_ok(layer)) return PlanError(absl::StrCat("refresh layer ", layer));
  }
  return absl::OkStatus();
}

absl::Status CheckPlanMatchesModel(const plan::Plan& plan, const plan::ModelFingerprint& model) {
  const plan::ModelFingerprint& planned = plan.model();
  auto mismatch = [](const char* what, auto planned_value, auto model_value) {
    return absl::FailedPreconditionError(absl::StrCat("plan was calibrated for another model: ", what, " ",
                                                      planned_value, " in the plan, ", model_value, " in the model"));
  };
  if (planned.architecture() != model.architecture())
    return mismatch("architecture", planned.architecture(), model.architecture());
  if (planned.num_layers() != model.num_layers()) return mismatch("layers", planned.num_layers(), model.num_layers());
  if (planned.hidden_size() != model.hidden_size())
    return mismatch("hidden size", planned.hidden_size(), model.hidden_size());
  if (planned.num_heads() != model.num_heads()) return mismatch("heads", planned.num_heads(), model.num_heads());
  if (planned.num_kv_heads() != model.num_kv_heads())
    return mismatch("KV heads", planned.num_kv_heads(), model.num_kv_heads());
  if (planned.head_dim() != model.head_dim()) return mismatch("head_dim", planned.head_dim(), model.head_dim());
  if (planned.vocab_size() != model.vocab_size())
    return mismatch("vocabulary", planned.vocab_size(), model.vocab_size());
  if (planned.weights_hash() != model.weights_hash())
    return mismatch("weights hash", absl::StrCat(absl::Hex(planned.weights_hash())),
                    absl::StrCat(absl::Hex(model.weights_hash())));
  return absl::OkStatus();
}

}  // namespace kvplan
