#include "calibrate/plan_verification.h"

#include <memory>
#include <utility>

#include "base/status_macros.h"
#include "runtime/cache/plan_policies.h"

namespace kvplan {

absl::Status VerifyPlan(CalibrationSession& session, PlanLossSequences sequences, StageClock& clock, plan::Plan& plan) {
  clock.Progress("optimiser: verifying the plan", 0, 1);
  KVPLAN_ASSIGN_OR_RETURN(PlanPolicies policies, PoliciesFromPlan(plan, session.config(), session.weights()));
  KVPLAN_ASSIGN_OR_RETURN(Model * model, session.Runtime());
  PlanLossMeter meter(*model, std::move(sequences));
  KVPLAN_RETURN_IF_ERROR(meter.RunReference());
  KVPLAN_ASSIGN_OR_RETURN(const PlanLoss loss,
                          meter.Measure(std::make_shared<const PlanPolicies>(std::move(policies))));
  plan::OptimiserDecisions* decisions = plan.mutable_optimiser();
  decisions->set_verified_kl(loss.text.kl);
  decisions->set_verified_top1_agreement(loss.text.top1_agreement);
  decisions->set_verified_tokens(loss.text.tokens);
  decisions->set_verified_probe_kl(loss.probes.kl);
  decisions->set_verified_probe_top1_agreement(loss.probes.top1_agreement);
  clock.Progress("optimiser: verifying the plan", 1, 1);
  return absl::OkStatus();
}

}  // namespace kvplan
