// The status macros of the whole tree (abseil 20220623, Debian's, has none public).
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVPLAN_STATUS_CONCAT_INNER(a, b) a##b
#define KVPLAN_STATUS_CONCAT(a, b) KVPLAN_STATUS_CONCAT_INNER(a, b)

// Returns the status of `expr` from the enclosing function unless it is OK.
#define KVPLAN_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                    \
    if (::absl::Status kvplan_status = (expr); !kvplan_status.ok()) return kvplan_status; \
  } while (0)

// `lhs = value of expr`, or returns its status from the enclosing function. lhs may declare a variable
// (`auto model`) or name an existing one. It expands to several statements: inside an if or a loop, use braces.
#define KVPLAN_ASSIGN_OR_RETURN(lhs, expr) \
  KVPLAN_ASSIGN_OR_RETURN_IMPL(KVPLAN_STATUS_CONCAT(kvplan_statusor_, __LINE__), lhs, expr)
#define KVPLAN_ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                                 \
  if (!statusor.ok()) return statusor.status();           \
  lhs = std::move(*statusor)
