// The cache policy: for each layer, what its KV cache shares, keeps, codes and refreshes, and what that costs in
// bytes. It is derived from the plan schema and nowhere else; the planner estimates with it and every runtime
// executes it, so a plan's predicted bytes and a runtime's measured bytes come from the same function.
//
// Every size a policy implies is a deterministic function of the sequence length (only *which* entries are kept
// depends on data), so a host can size every buffer without reading anything back from a device.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "base/number_formats.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// What one stored item costs. K and V are stored as bf16 whatever a runtime computes in.
inline constexpr int64_t kCacheValueBytes = 2;
inline constexpr int64_t kMergedValueBytes = 4;  // a merged slot's running means of K and V stay fp32
inline constexpr int64_t kMergedCountBytes = 4;  // and the number of tokens folded into it (fp32)
inline constexpr int64_t kCodeBytes = 4;         // one (uint16 atom index, fp16 coefficient) pair
inline constexpr int64_t kPositionBytes = 4;     // int32, once eviction or coding breaks position == entry index
inline constexpr int64_t kScoreBytes = 4;        // budgets: an entry's eviction score (key norm or attention), fp32
inline constexpr int64_t kSelectionBytes = 1;    // RefreshKV: whether the small cache holds the entry

// Entries older than the recent window are coded: as CSR / NeuralDict (atom, coefficient) pairs, or quantized to
// key_bits / value_bits per channel (KIVI-style, plan::KvQuantization).
struct CodingPolicy {
  // 32-bit words per coded key and value: (atom, coefficient) pairs, or QuantizedWords when quantized.
  int key_sparsity = 0;
  int value_sparsity = 0;
  int key_bits = 0, value_bits = 0;  // > 0: quantized
  int recent_window = 0;             // newest tokens stay dense
  // Keys are coded after RoPE (a query meets coded keys through one q . dictionary table per step) or, as in
  // the CSR paper, before it (each coded key is rebuilt and rotated to its position).
  bool keys_after_rope = false;

  bool quantized() const { return key_bits > 0; }
};

// Token budgets. The defaults are the planner's defaults; a plan always states every field.
struct BudgetPolicy {
  std::vector<float> head_keep_fraction;  // per KV head: fraction of the context kept (1 = no eviction)
  plan::TokenBudgets::Scoring scoring = plan::TokenBudgets::KEY_L2_NORM;
  int recent_window = 32;           // newest tokens never evicted
  int sink_tokens = 4;              // first tokens never evicted
  int min_tokens = 16;              // no head keeps fewer
  bool merge_evicted = true;        // ZeroMerge: evicted tokens fold into one residual slot per head
  float merge_compensation = 1.0f;  // the slot's logit bias is this * log(tokens merged)
  float score_decay = 0.98f;        // per-step decay of accumulated attention scores
};

// RefreshKV. The defaults are the planner's defaults.
struct RefreshPolicy {
  float small_cache_fraction = 0.125f;  // K = L / 8, as in the paper
  int min_small_cache_tokens = 64;
  int refresh_stride = 8;                    // a full step at least every this many steps
  float query_similarity_threshold = 0.85f;  // or earlier, when the query's cosine to the last full step drops below
  int pool_kernel = 7;                       // max-pool width over positions when selecting
};

struct LayerPolicy {
  int donor = -1;  // KVSharer: >= 0 when this layer attends over that layer's cache and stores nothing
  std::optional<CodingPolicy> coding;
  std::optional<BudgetPolicy> budget;
  std::optional<RefreshPolicy> refresh;

  bool shares() const { return donor >= 0; }
  // The plain full cache: every token, dense, positions implied by entry order.
  bool keeps_full_cache() const { return !shares() && !coding && !budget && !refresh; }
  // Entries carry their positions (and scores, codes or selection flags as the methods need).
  bool stores_compressed() const { return !shares() && !keeps_full_cache(); }
};

struct CachePolicy {
  int num_kv_heads = 0;
  int head_dim = 0;
  std::vector<LayerPolicy> layers;  // [num_layers]
};

// The policy a plan states. Expects a plan that passed ValidatePlanStructure.
CachePolicy CachePolicyFromPlan(const plan::Plan& plan);
// The planner's side: a policy's settings written into the plan (budget fractions and layer lists aside).
void WriteBudgetPolicy(const BudgetPolicy& policy, plan::TokenBudgets* budgets);
void WriteRefreshPolicy(const RefreshPolicy& policy, plan::RefreshSchedule* refresh);

// Plain (unmerged) entries a budgeted head may keep at `length` tokens.
int64_t HeadTokenBudget(const BudgetPolicy& budget, int kv_head, int64_t length);
// Newest tokens eviction never takes: the budget's recent window and, on a coded layer, the coding window, so
// the dense recent entries are exactly the newest min(length, coding window) tokens.
int64_t ProtectedRecentTokens(const LayerPolicy& layer);
// Entries a RefreshKV full step selects for the small cache at `length` tokens (never more than there are).
int64_t SmallCacheTokens(const RefreshPolicy& refresh, int64_t length);
// Tokens a head keeps as plain entries (dense or coded, not merged) once `length` tokens have been appended and
// the policy applied. Eviction removes candidates (neither sinks nor protected) until the budget is met, and the
// budget never shrinks as the sequence grows, so this depends on the length alone.
int64_t KeptTokens(const LayerPolicy& layer, int kv_head, int64_t length);

// What one KV head of one sequence stores.
struct HeadEntries {
  int64_t dense = 0;   // bf16 K and V: recent tokens of a coded head, every kept token of an uncoded one
  int64_t coded = 0;   // key and value codes
  int64_t merged = 0;  // ZeroMerge slots (0 or 1)
  bool operator==(const HeadEntries&) const = default;
};
// What a head holds once `length` tokens have been appended and the policy applied.
HeadEntries ExpectedHeadEntries(const LayerPolicy& layer, int kv_head, int64_t length);
// The bytes those entries take: the one byte count of the tree.
int64_t HeadBytes(const LayerPolicy& layer, int head_dim, const HeadEntries& entries);

// Bytes one sequence of `length` tokens holds under the policy (sharing layers hold none), and under the full
// cache.
int64_t CacheBytes(const CachePolicy& policy, int64_t length);
int64_t FullCacheBytes(int num_layers, int num_kv_heads, int head_dim, int64_t length);

}  // namespace kvplan
