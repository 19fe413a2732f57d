// CSR sparse coding against plain integer quantization of the same keys and values, at the bits per channel each
// spends (issue 9: CSR must at least match int4). Keys before RoPE and values come from a fixture model's
// forward passes: dictionaries learn from calibration text (as `kvplan calibrate` does), and every coder is
// judged on held-out text by the relative reconstruction error ||x - x'|| / ||x|| over all its vectors.
//   build/bench/coding_vs_quantization MODEL_DIR CALIBRATION_TEXT HELDOUT_TEXT [atoms=1024; 0: no CSR]
// Quantizers (asymmetric, round to nearest, fp16 scale and zero point per group):
//   per-token   one group per head vector (head_dim channels): bits + 32 / head_dim per channel (KIVI's values)
//   per-channel one group per channel and 128 consecutive tokens: bits + 32 / 128 per channel (KIVI's keys)
// CSR: s (16-bit atom, fp16 coefficient) pairs per head vector: 32 s / head_dim bits per channel.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "base/number_formats.h"
#include "base/status_macros.h"
#include "calibrate/dictionary_learning.h"
#include "kernels/compressed_layout.h"
#include "kernels/cpu/compressed/pursuit.h"
#include "loader/open_model.h"
#include "runtime/backend.h"
#include "runtime/cache/sparse_coding.h"

namespace kvplan {
namespace {

constexpr int kSequenceLength = 512;
constexpr int kChannelGroupTokens = 128;

// Each layer's head vectors in token order: [tokens, kv_heads, head_dim] per layer, keys before RoPE.
class KvCollector : public ForwardObserver {
 public:
  explicit KvCollector(int layers) : keys(layers), rotated_keys(layers), values(layers) {}
  void OnLayerKv(int layer, int rows, const float*, const float* k, const float* k_pre_rope, const float* v) override {
    const int64_t n = int64_t(rows) * kv_dim_;
    keys[layer].insert(keys[layer].end(), k_pre_rope, k_pre_rope + n);
    rotated_keys[layer].insert(rotated_keys[layer].end(), k, k + n);
    values[layer].insert(values[layer].end(), v, v + n);
  }
  void OnFinalHidden(int, const float*) override {}
  void set_kv_dim(int kv_dim) { kv_dim_ = kv_dim; }
  std::vector<std::vector<float>> keys, rotated_keys, values;

 private:
  int kv_dim_ = 0;
};

absl::StatusOr<KvCollector> Collect(const LoadedModel& loaded, const std::string& path, int sequences) {
  KvCollector collector(loaded.config.num_layers);
  collector.set_kv_dim(loaded.config.kv_dim());
  KVPLAN_ASSIGN_OR_RETURN(const std::vector<int32_t> tokens,
                          loaded.EncodeDataFile(path, int64_t(sequences) * kSequenceLength));
  KVPLAN_ASSIGN_OR_RETURN(auto model,
                          CreateModel(loaded.config, *loaded.weights,
                                      {.backend = Backend::kCpu, .capacity = kSequenceLength, .observer = &collector}));
  for (int64_t begin = 0; begin + kSequenceLength <= int64_t(tokens.size()); begin += kSequenceLength) {
    model->Reset();
    const std::vector<int32_t> sequence(tokens.begin() + begin, tokens.begin() + begin + kSequenceLength);
    KVPLAN_RETURN_IF_ERROR(model->Forward(SequenceRows(sequence, 0, 0), LogitRows::kLastPerSequence).status());
  }
  return collector;
}

// Rounds `count` values spaced `stride` apart from `first` to `bits` levels between their fp16 minimum and maximum.
void QuantizeGroup(float* first, int count, int64_t stride, int bits) {
  float low = first[0], high = first[0];
  for (int i = 0; i < count; ++i) {
    low = std::min(low, first[i * stride]);
    high = std::max(high, first[i * stride]);
  }
  const float levels = float((1 << bits) - 1);
  const float zero = Fp16ToFloat(FloatToFp16(low)), scale = Fp16ToFloat(FloatToFp16((high - low) / levels));
  for (int i = 0; i < count; ++i) {
    float& x = first[i * stride];
    x = scale > 0 ? zero + scale * std::clamp(std::nearbyint((x - zero) / scale), 0.0f, levels) : zero;
  }
}

double RelativeError(const std::vector<float>& x, const std::vector<float>& coded) {
  double error = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    error += double(x[i] - coded[i]) * (x[i] - coded[i]);
    norm += double(x[i]) * x[i];
  }
  return std::sqrt(error / std::max(norm, 1e-30));
}

// x: [tokens, kv_heads, head_dim] of one layer.
double PerTokenError(const std::vector<float>& x, int head_dim, int bits) {
  std::vector<float> coded = x;
  for (size_t v = 0; v + head_dim <= coded.size(); v += head_dim) QuantizeGroup(coded.data() + v, head_dim, 1, bits);
  return RelativeError(x, coded);
}
// Per token in groups of `group` channels, after dividing each channel by a scale learned from calibration
// vectors (the RMS of the channel's RoPE pair per KV head), so outlier channels do not set every token's range.
std::vector<float> PairScales(const std::vector<float>& x, int kv_dim, int head_dim) {
  std::vector<double> sum(kv_dim, 0);
  const int64_t tokens = int64_t(x.size()) / kv_dim;
  for (int64_t t = 0; t < tokens; ++t)
    for (int c = 0; c < kv_dim; ++c) sum[c] += double(x[t * kv_dim + c]) * x[t * kv_dim + c];
  std::vector<float> scale(kv_dim);
  const int half = head_dim / 2;
  for (int c = 0; c < kv_dim; ++c) {
    const int head = c / head_dim, i = c % head_dim, partner = head * head_dim + (i < half ? i + half : i - half);
    scale[c] = float(std::sqrt((sum[c] + sum[partner]) / (2.0 * std::max<int64_t>(tokens, 1))) + 1e-6);
  }
  return scale;
}
double SmoothedPerTokenError(const std::vector<float>& x, const std::vector<float>& scale, int group, int bits) {
  const int kv_dim = int(scale.size());
  std::vector<float> coded = x;
  for (size_t i = 0; i < coded.size(); ++i) coded[i] /= scale[i % kv_dim];
  for (size_t v = 0; v + group <= coded.size(); v += group) QuantizeGroup(coded.data() + v, group, 1, bits);
  for (size_t i = 0; i < coded.size(); ++i) coded[i] *= scale[i % kv_dim];
  return RelativeError(x, coded);
}
// x <- H D x per head vector: D random signs (fixed), H the normalized Walsh-Hadamard transform; inverse too.
void Rotate(std::vector<float>& x, int head_dim, bool inverse) {
  std::vector<float> sign(head_dim);
  for (int i = 0; i < head_dim; ++i) sign[i] = (NoiseBits(7, i) & 1) ? 1.0f : -1.0f;
  const float norm = 1.0f / std::sqrt(float(head_dim));
  for (size_t v = 0; v + head_dim <= x.size(); v += head_dim) {
    float* h = x.data() + v;
    if (!inverse)
      for (int i = 0; i < head_dim; ++i) h[i] *= sign[i];
    for (int len = 1; len < head_dim; len <<= 1)
      for (int i = 0; i < head_dim; i += 2 * len)
        for (int j = i; j < i + len; ++j) {
          const float a = h[j], b = h[j + len];
          h[j] = a + b;
          h[j + len] = a - b;
        }
    for (int i = 0; i < head_dim; ++i) h[i] *= norm;
    if (inverse)
      for (int i = 0; i < head_dim; ++i) h[i] *= sign[i];
  }
}
double RotatedPerTokenError(const std::vector<float>& x, const std::vector<float>& scale, int head_dim, int group,
                            int bits) {
  const int kv_dim = int(scale.size());
  std::vector<float> coded = x;
  for (size_t i = 0; i < coded.size(); ++i) coded[i] /= scale[i % kv_dim];
  Rotate(coded, head_dim, false);
  for (size_t v = 0; v + group <= coded.size(); v += group) QuantizeGroup(coded.data() + v, group, 1, bits);
  Rotate(coded, head_dim, true);
  for (size_t i = 0; i < coded.size(); ++i) coded[i] *= scale[i % kv_dim];
  return RelativeError(x, coded);
}
double PerChannelError(const std::vector<float>& x, int kv_dim, int bits) {
  std::vector<float> coded = x;
  const int64_t tokens = int64_t(x.size()) / kv_dim;
  for (int64_t first = 0; first < tokens; first += kChannelGroupTokens)
    for (int c = 0; c < kv_dim; ++c)
      QuantizeGroup(coded.data() + first * kv_dim + c, int(std::min<int64_t>(kChannelGroupTokens, tokens - first)),
                    kv_dim, bits);
  return RelativeError(x, coded);
}
double CodingError(const plan::Dictionary& dictionary, const std::vector<float>& x, int head_dim, int sparsity) {
  const std::vector<float> atoms(dictionary.values().begin(), dictionary.values().end());
  const int64_t n = int64_t(x.size()) / head_dim;
  const SparseCodes codes = MatchingPursuit(atoms.data(), dictionary.atoms(), head_dim, x.data(), n, sparsity);
  std::vector<float> coded(x.size());
  for (int64_t i = 0; i < n; ++i)
    cpu::decode_sparse(atoms.data(), head_dim, codes.indices.data() + i * sparsity,
                       codes.coefficients.data() + i * sparsity, sparsity, coded.data() + i * head_dim);
  return RelativeError(x, coded);
}

int Run(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: coding_vs_quantization MODEL_DIR CALIBRATION_TEXT HELDOUT_TEXT [atoms]\n");
    return 2;
  }
  const int atoms = argc > 4 ? std::atoi(argv[4]) : 1024;
  auto loaded = OpenModel(argv[1]);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  auto calibration = Collect(*loaded, argv[2], 16);
  auto heldout = calibration.ok() ? Collect(*loaded, argv[3], 8) : calibration.status();
  if (!heldout.ok()) {
    std::fprintf(stderr, "%s\n", heldout.status().ToString().c_str());
    return 1;
  }
  const int hd = loaded->config.head_dim, kv_dim = loaded->config.kv_dim();
  std::printf("relative error on held-out text, mean over %d layers (bits per channel in brackets)\n",
              loaded->config.num_layers);
  struct Row {
    std::string name;
    double bits, keys = 0, values = 0;
  };
  std::vector<Row> rows;
  for (int bits : {2, 3, 4}) {
    rows.push_back({"int" + std::to_string(bits) + " per token", bits + 32.0 / hd});
    rows.push_back({"int" + std::to_string(bits) + " per channel", bits + 32.0 / kChannelGroupTokens});
  }
  const std::vector<float> unit_scale(kv_dim, 1.0f);
  for (int bits : {2, 4})
    for (int group : {hd, hd / 2}) {
      rows.push_back({"RoPE'd int" + std::to_string(bits) + " tok g" + std::to_string(group), bits + 32.0 / group});
      rows.push_back(
          {"RoPE'd int" + std::to_string(bits) + " tok g" + std::to_string(group) + " scaled", bits + 32.0 / group});
    }
  for (int bits : {2, 4}) rows.push_back({"RoPE'd int" + std::to_string(bits) + " per channel", bits + 32.0 / 128});
  for (int bits : {2, 3, 4})
    for (int scaled : {0, 1})
      rows.push_back({"Hadamard int" + std::to_string(bits) + (scaled ? " scaled" : ""), bits + 32.0 / hd});
  for (int sparsity : {4, 8})
    if (atoms > 0)
      rows.push_back({"CSR " + std::to_string(atoms) + " atoms, s=" + std::to_string(sparsity), 32.0 * sparsity / hd});
  const int layers = loaded->config.num_layers;
  for (int l = 0; l < layers; ++l) {
    const auto& keys = heldout->keys[l];
    const auto& values = heldout->values[l];
    size_t r = 0;
    for (int bits : {2, 3, 4}) {
      rows[r].keys += PerTokenError(keys, hd, bits) / layers;
      rows[r++].values += PerTokenError(values, hd, bits) / layers;
      rows[r].keys += PerChannelError(keys, kv_dim, bits) / layers;
      rows[r++].values += PerChannelError(values, kv_dim, bits) / layers;
    }
    const std::vector<float> key_scale = PairScales(calibration->rotated_keys[l], kv_dim, hd);
    const std::vector<float> value_scale = PairScales(calibration->values[l], kv_dim, hd);
    const auto& rotated = heldout->rotated_keys[l];
    for (int bits : {2, 4})
      for (int group : {hd, hd / 2}) {
        rows[r].keys += SmoothedPerTokenError(rotated, unit_scale, group, bits) / layers;
        rows[r++].values += SmoothedPerTokenError(values, unit_scale, group, bits) / layers;
        rows[r].keys += SmoothedPerTokenError(rotated, key_scale, group, bits) / layers;
        rows[r++].values += SmoothedPerTokenError(values, value_scale, group, bits) / layers;
      }
    for (int bits : {2, 4}) {
      rows[r].keys += PerChannelError(rotated, kv_dim, bits) / layers;
      rows[r++].values += PerChannelError(values, kv_dim, bits) / layers;
    }
    for (int bits : {2, 3, 4})
      for (int scaled : {0, 1}) {
        rows[r].keys += RotatedPerTokenError(rotated, scaled ? key_scale : unit_scale, hd, hd, bits) / layers;
        rows[r++].values += RotatedPerTokenError(values, scaled ? value_scale : unit_scale, hd, hd, bits) / layers;
      }
    if (atoms == 0) continue;
    for (int sparsity : {4, 8}) {
      const plan::Dictionary key_atoms = LearnDictionary(calibration->keys[l], hd, atoms, sparsity, 6);
      const plan::Dictionary value_atoms = LearnDictionary(calibration->values[l], hd, atoms, sparsity, 6);
      rows[r].keys += CodingError(key_atoms, keys, hd, sparsity) / layers;
      rows[r++].values += CodingError(value_atoms, values, hd, sparsity) / layers;
    }
    std::fprintf(stderr, "layer %d done\n", l);
  }
  std::printf("%-28s %8s %10s %10s\n", "coder", "bits/ch", "keys", "values");
  for (const Row& row : rows)
    std::printf("%-28s %8.2f %10.4f %10.4f\n", row.name.c_str(), row.bits, row.keys, row.values);
  return 0;
}

}  // namespace
}  // namespace kvplan

int main(int argc, char** argv) { return kvplan::Run(argc, argv); }
