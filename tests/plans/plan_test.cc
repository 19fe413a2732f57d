// Plan files: round trip, and every way a file can be wrong (truncated, corrupt, foreign, future version,
// inconsistent, for another model) gives an error naming the problem. Includes a seeded mutation fuzz.

#include "absl/strings/match.h"
#include "loader/open_model.h"
#include "planner/planner.h"
#include "plans/plan_io.h"
#include "runtime/cache/plan_policies.h"
#include "tests/testing/test_util.h"

namespace kvplan {
namespace {

plan::Plan SmallPlan() {
  plan::Plan plan;
  plan::ModelFingerprint* model = plan.mutable_model();
  model->set_architecture("LlamaForCausalLM");
  model->set_num_layers(4);
  model->set_hidden_size(64);
  model->set_num_heads(4);
  model->set_num_kv_heads(2);
  model->set_head_dim(16);
  model->set_vocab_size(100);
  model->set_weights_hash(0x1234);
  auto* share = plan.mutable_sharing()->add_shares();
  share->set_layer(3);
  share->set_donor(1);
  plan::SparseCoding* coding = plan.mutable_sparse_coding();
  coding->set_key_sparsity(2);
  coding->set_value_sparsity(2);
  coding->set_recent_window(8);
  auto* layer = coding->add_layers();
  layer->set_layer(0);
  for (plan::Dictionary* dictionary : {layer->mutable_keys(), layer->mutable_values()}) {
    dictionary->set_atoms(4);
    dictionary->set_dim(16);
    for (int i = 0; i < 64; ++i) dictionary->add_values(float(i % 16 == i / 16));
  }
  plan::TokenBudgets* budgets = plan.mutable_budgets();
  budgets->set_scoring(plan::TokenBudgets::KEY_L2_NORM);
  auto* budget = budgets->add_layers();
  budget->set_layer(2);
  budget->add_head_keep_fraction(0.5f);
  budget->add_head_keep_fraction(0.25f);
  return plan;
}

TEST(PlanFileTest, RoundTrips) {
  const plan::Plan plan = SmallPlan();
  KVPLAN_ASSERT_OK_AND_ASSIGN(parsed, ParsePlanFile(SerializePlanFile(plan)));
  EXPECT_EQ(parsed.format_version(), kPlanFormatVersion);
  EXPECT_EQ(parsed.sharing().shares(0).donor(), 1);
  EXPECT_EQ(parsed.sparse_coding().layers(0).keys().values_size(), 64);
}

TEST(PlanFileTest, DamagedFilesAreNamedAsSuch) {
  const std::string bytes = SerializePlanFile(SmallPlan());
  auto message = [](const absl::StatusOr<plan::Plan>& result) { return std::string(result.status().message()); };

  const auto truncated = ParsePlanFile(bytes.substr(0, bytes.size() - 5));
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(message(truncated).find("truncated"), std::string::npos);

  std::string corrupt = bytes;
  corrupt[corrupt.size() / 2] ^= 0x40;
  const auto corrupted = ParsePlanFile(corrupt);
  ASSERT_FALSE(corrupted.ok());
  EXPECT_NE(message(corrupted).find("checksum"), std::string::npos);

  const auto foreign = ParsePlanFile("PK\x03\x04 this is a zip file, not a plan");
  ASSERT_FALSE(foreign.ok());
  EXPECT_NE(message(foreign).find("magic"), std::string::npos);

  std::string future = bytes;
  future[8] = 99;
  const auto newer = ParsePlanFile(future);
  ASSERT_FALSE(newer.ok());
  EXPECT_NE(message(newer).find("version 99"), std::string::npos);

  EXPECT_EQ(ReadPlanFile("/nonexistent/plan.kvplan").status().code(), absl::StatusCode::kNotFound);
}

TEST(PlanFileTest, InconsistentPlansAreRejected) {
  plan::Plan backwards = SmallPlan();
  backwards.mutable_sharing()->mutable_shares(0)->set_donor(3);
  EXPECT_FALSE(ValidatePlanStructure(backwards).ok());

  plan::Plan chained = SmallPlan();
  auto* share = chained.mutable_sharing()->add_shares();
  share->set_layer(1);
  share->set_donor(0);
  EXPECT_FALSE(ValidatePlanStructure(chained).ok());  // layer 1 donates to 3 and shares from 0

  plan::Plan short_dictionary = SmallPlan();
  short_dictionary.mutable_sparse_coding()->mutable_layers(0)->mutable_keys()->mutable_values()->RemoveLast();
  EXPECT_FALSE(ValidatePlanStructure(short_dictionary).ok());

  plan::Plan bad_fraction = SmallPlan();
  bad_fraction.mutable_budgets()->mutable_layers(0)->set_head_keep_fraction(0, 1.5f);
  EXPECT_FALSE(ValidatePlanStructure(bad_fraction).ok());

  // Quantization: widths 2/4/8, one positive scale per key channel, and never on a sparse-coded layer.
  auto quantized = [](int layer, int bits) {
    plan::Plan plan = SmallPlan();
    auto* entry = plan.mutable_quantization()->add_layers();
    entry->set_layer(layer);
    entry->set_key_bits(bits);
    entry->set_value_bits(4);
    entry->mutable_key_channel_scale()->Resize(plan.model().num_kv_heads() * plan.model().head_dim(), 1.0f);
    return plan;
  };
  const int uncoded = 2;  // neither sparse-coded nor a sharer
  EXPECT_TRUE(ValidatePlanStructure(quantized(uncoded, 2)).ok()) << ValidatePlanStructure(quantized(uncoded, 2));
  EXPECT_TRUE(absl::StrContains(ValidatePlanStructure(quantized(uncoded, 3)).message(), "quantizes to 3 bits"));
  plan::Plan short_scales = quantized(uncoded, 4);
  short_scales.mutable_quantization()->mutable_layers(0)->mutable_key_channel_scale()->RemoveLast();
  EXPECT_TRUE(absl::StrContains(ValidatePlanStructure(short_scales).message(), "key channel scales"));
  plan::Plan zero_scale = quantized(uncoded, 4);
  zero_scale.mutable_quantization()->mutable_layers(0)->set_key_channel_scale(0, 0.0f);
  EXPECT_FALSE(ValidatePlanStructure(zero_scale).ok());
  const int coded = SmallPlan().sparse_coding().layers(0).layer();
  EXPECT_TRUE(
      absl::StrContains(ValidatePlanStructure(quantized(coded, 4)).message(), "both sparse-coded and quantized"));

  // WritePlanFile refuses to write an inconsistent plan.
  EXPECT_FALSE(WritePlanFile(bad_fraction, "/tmp/kvplan_bad_plan.kvplan").ok());
}

TEST(PlanFileTest, PlanForAnotherModelIsRefused) {
  KVPLAN_ASSERT_OK_AND_ASSIGN(loaded, OpenModel(testing::FixtureModelDir()));
  plan::Plan plan;
  *plan.mutable_model() = FingerprintModel(loaded.config, *loaded.weights);
  EXPECT_TRUE(PoliciesFromPlan(plan, loaded.config, *loaded.weights).ok());
  plan.mutable_model()->set_weights_hash(plan.model().weights_hash() + 1);
  const auto fine_tune = PoliciesFromPlan(plan, loaded.config, *loaded.weights);
  ASSERT_FALSE(fine_tune.ok());
  EXPECT_NE(fine_tune.status().message().find("weights hash"), std::string::npos);
  plan.mutable_model()->set_num_layers(32);
  const auto other = PoliciesFromPlan(plan, loaded.config, *loaded.weights);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find("another model"), std::string::npos);
}

TEST(PlannerTest, BudgetsMeetTheMemoryTarget) {
  PlannerInputs inputs;
  *inputs.model.mutable_architecture() = "LlamaForCausalLM";
  inputs.model.set_num_layers(6);
  inputs.model.set_num_kv_heads(2);
  inputs.model.set_head_dim(64);
  inputs.model.set_num_heads(4);
  inputs.target_memory_ratio = 0.5f;
  inputs.attention_coverage = std::vector<std::vector<float>>(6, {0.2f, 0.6f});
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, CompilePlan(inputs));
  const double ratio = double(PlanCacheBytes(plan, 2048)) / FullCacheBytes(plan.model(), 2048);
  EXPECT_LE(ratio, 0.5);
  EXPECT_GT(ratio, 0.45);
  ASSERT_EQ(plan.budgets().layers_size(), 4);  // layers 0 and 1 exempt
  // The head with three times the attention coverage gets three times the budget (until capped at 1).
  const auto& fractions = plan.budgets().layers(0).head_keep_fraction();
  EXPECT_NEAR(fractions[1] / fractions[0], 3.0f, 0.01f);
  const std::string text = DescribePlan(plan);
  EXPECT_NE(text.find("token budgets"), std::string::npos);
  EXPECT_NE(text.find("32768"), std::string::npos);
  const std::string custom = DescribePlan(plan, {3000});
  EXPECT_NE(custom.find("    3000"), std::string::npos);
  EXPECT_EQ(custom.find("32768"), std::string::npos);
  KVPLAN_ASSERT_OK_AND_ASSIGN(json, PlanToJson(plan, false));
  EXPECT_NE(json.find("headKeepFraction"), std::string::npos);
}

// The optimiser compresses where measured loss per byte is least: layer 0 loses 100 times what layer 1 does at
// every setting and layer 2 a hundredth, so layer 2 is compressed most and layer 0 least; a setting that saves
// bytes at no extra loss makes the larger ones pointless; layer 3 shares and gets no decision.
TEST(PlannerTest, OptimiserSpendsLossWhereItIsCheapest) {
  PlannerInputs inputs;
  *inputs.model.mutable_architecture() = "LlamaForCausalLM";
  inputs.model.set_num_layers(4);
  inputs.model.set_num_kv_heads(2);
  inputs.model.set_head_dim(64);
  inputs.model.set_num_heads(4);
  inputs.target_memory_ratio = 0.35f;
  auto* share = inputs.sharing.add_shares();
  share->set_layer(3);
  share->set_donor(1);
  inputs.quantization.set_recent_window(64);
  for (int layer = 0; layer < 4; ++layer) {
    auto* entry = inputs.quantization.add_layers();
    entry->set_layer(layer);
    entry->mutable_key_channel_scale()->Resize(2 * 64, 1.0f);
  }
  auto settings = [](double scale) {
    return std::vector<MeasuredSetting>{{{8, 1.0f}, 0.001 * scale},
                                        {{4, 1.0f}, 0.01 * scale},
                                        {{2, 1.0f}, 0.2 * scale},
                                        {{16, 0.5f}, 0.05 * scale},
                                        {{4, 0.5f}, 0.06 * scale}};
  };
  inputs.measured_settings = {settings(100), settings(1), settings(0.01), settings(1)};
  inputs.measured_settings[2][1].kl = 0;  // 4 bits as good as 8: 8 is never worth it
  KVPLAN_ASSERT_OK_AND_ASSIGN(plan, CompilePlan(inputs));
  const double ratio = double(PlanCacheBytes(plan, 2048)) / FullCacheBytes(plan.model(), 2048);
  EXPECT_LE(ratio, 0.35);
  const auto& decisions = plan.optimiser().layers();
  ASSERT_EQ(decisions.size(), 3);  // the sharer has none
  EXPECT_EQ(decisions[2].layer(), 2);
  EXPECT_GE(decisions[0].bytes(), decisions[1].bytes());
  EXPECT_GT(decisions[1].bytes(), decisions[2].bytes());
  EXPECT_LT(decisions[2].bits(), 8);  // 8 and 16 bits cost layer 2 more bytes for no less loss than 4
  EXPECT_EQ(plan.optimiser().candidates_measured(), 20);
  double predicted = 0;
  for (const auto& decision : decisions) {
    predicted += decision.predicted_kl();
    EXPECT_LE(decision.bytes(), decision.full_bytes());
  }
  EXPECT_DOUBLE_EQ(plan.optimiser().predicted_kl(), predicted);
  // What the decisions say is what the plan does.
  for (const auto& entry : plan.quantization().layers())
    EXPECT_EQ(entry.key_bits(), decisions[entry.layer()].bits()) << entry.layer();
  EXPECT_NE(DescribePlan(plan).find("quality optimiser: 20 settings measured"), std::string::npos);
}

}  // namespace
}  // namespace kvplan
