// Reading, writing and checking plan files. A plan file is self-checking: magic, format version, length and
// checksum come before the protobuf payload, so truncation, corruption and files from a newer kvplan are
// reported as such instead of parsing into a half-empty plan.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "plans/kvplan.pb.h"

namespace kvplan {

// 2: the payload checksum and the weights hash are base/hash.h's word-wise FNV-1a (1 hashed bytewise).
inline constexpr uint32_t kPlanFormatVersion = 2;

std::string SerializePlanFile(const plan::Plan& plan);
absl::StatusOr<plan::Plan> ParsePlanFile(std::string_view bytes);
absl::Status WritePlanFile(const plan::Plan& plan, const std::string& path);
absl::StatusOr<plan::Plan> ReadPlanFile(const std::string& path);

// Internal consistency: layer and head indices inside the fingerprint's shape, donors earlier than sharers and
// not themselves sharers, dictionary sizes, fractions in (0, 1].
absl::Status ValidatePlanStructure(const plan::Plan& plan);
// The plan was calibrated for exactly this model.
absl::Status CheckPlanMatchesModel(const plan::Plan& plan, const plan::ModelFingerprint& model);

}  // namespace kvplan
