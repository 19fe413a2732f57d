#include "runtime/cache/layer_cache.h"

#include <cmath>
#include <numeric>
#include <random>

#include "kernels/cpu/attention.h"
#include "plans/cache_policy.h"

namespace kvplan {
namespace {

class DenseLayerCache : public LayerCache {
 public:
  DenseLayerCache(const ModelConfig& config, int num_sequences, int capacity)
      : config_(config),
        capacity_(capacity),
        keys_(size_t(num_sequences) * config.num_kv_heads * capacity * config.head_dim),
        values_(keys_.size()),
        lengths_(num_sequences, 0),
        entry_positions_(capacity) {
    std::iota(entry_positions_.begin(), entry_positions_.end(), 0);
  }

  void Append(int sequence, const int32_t* positions, int rows, const float*, const float* k, const float* v) override {
    const int hd = config_.head_dim;
    for (int r = 0; r < rows; ++r)
      for (int h = 0; h < config_.num_kv_heads; ++h) {
        const int64_t entry = Offset(sequence, h) + int64_t(positions[r]) * hd;
        const int64_t source = (int64_t(r) * config_.num_kv_heads + h) * hd;
        std::copy_n(k + source, hd, keys_.data() + entry);
        std::copy_n(v + source, hd, values_.data() + entry);
      }
    lengths_[sequence] = positions[rows - 1] + 1;
  }

  void Attend(int sequence, const int32_t* positions, int rows, const float* q, float* out) override {
    std::vector<cpu::KvHeadView> views(config_.num_kv_heads);
    for (int h = 0; h < config_.num_kv_heads; ++h)
      views[h] = {keys_.data() + Offset(sequence, h), values_.data() + Offset(sequence, h), entry_positions_.data(),
                  lengths_[sequence]};
    cpu::attention(q, positions, rows, config_.num_heads, views.data(), config_.num_kv_heads, config_.head_dim,
                   1.0f / std::sqrt(float(config_.head_dim)), config_.sliding_window, out);
  }

  void Reset() override { std::fill(lengths_.begin(), lengths_.end(), 0); }
  void ResetSequence(int sequence) override { lengths_[sequence] = 0; }

  void FillWithNoise(int context) override {
    std::mt19937 generator(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& value : keys_) value = normal(generator);
    for (float& value : values_) value = normal(generator);
    std::fill(lengths_.begin(), lengths_.end(), context);
  }

  int64_t bytes() const override {
    const int64_t tokens = std::accumulate(lengths_.begin(), lengths_.end(), int64_t(0));
    return config_.num_kv_heads * HeadBytes(LayerPolicy{}, config_.head_dim, {.dense = tokens});
  }

 private:
  int64_t Offset(int sequence, int kv_head) const {
    return (int64_t(sequence) * config_.num_kv_heads + kv_head) * capacity_ * config_.head_dim;
  }

  ModelConfig config_;
  int capacity_;
  std::vector<float> keys_, values_;  // [sequence, kv_head, capacity, head_dim]
  std::vector<int32_t> lengths_;
  std::vector<int32_t> entry_positions_;  // entry j holds position j
};

}  // namespace

std::unique_ptr<LayerCache> CreateDenseLayerCache(const ModelConfig& config, int num_sequences, int capacity) {
  return std::make_unique<DenseLayerCache>(config, num_sequences, capacity);
}

}  // namespace kvplan
