# Fails when a room includes a room it must not depend on. Run as: cmake -DSOURCE_DIR=... -P check_layering.cmake
#   kernels  <- nothing of kvplan's but kernels and base/number_formats.h; no .cu or .cuh includes abseil or protobuf
#   base, plans, planner: never runtime, loader, kernels, eval or calibrate (planner and runtime meet only in plans)
#   loader: never plans, runtime, eval, planner or calibrate;  runtime: never eval, planner or calibrate
#   calibrate: never eval (it reads text through loader/), nor, outside calibrate/cuda/, the GPU's rooms or #ifdef CUDA
#   sweep: never cli;  serve: never eval, planner or calibrate
#   capi: the runtime's rooms only
set(rules
  "kernels:base/status_macros|base/hash|plans/|loader/|runtime/|eval/|planner/|calibrate/|cli/"
  "base:kernels/|plans/|loader/|runtime/|eval/|planner/|calibrate/|cli/"
  "plans:kernels/|loader/|runtime/|eval/|planner/|calibrate/|cli/"
  "planner:kernels/|loader/|runtime/|eval/|calibrate/|cli/"
  "loader:kernels/|plans/|runtime/|eval/|planner/|calibrate/|cli/"
  "runtime:eval/|planner/|calibrate/|cli/"
  "eval:planner/|calibrate/|cli/"
  "calibrate:eval/|sweep/|cli/"
  "sweep:cli/"
  "serve:eval/|planner/|calibrate/|cli/"
  "capi:eval/|planner/|calibrate/|serve/|sweep/|cli/")
set(violations "")
foreach(rule IN LISTS rules)
  string(REPLACE ":" ";" parts "${rule}")
  list(GET parts 0 room)
  list(GET parts 1 forbidden)
  file(GLOB_RECURSE sources "${SOURCE_DIR}/${room}/*.h" "${SOURCE_DIR}/${room}/*.cc" "${SOURCE_DIR}/${room}/*.cu"
       "${SOURCE_DIR}/${room}/*.cuh")
  foreach(source IN LISTS sources)
    file(STRINGS "${source}" includes REGEX "^#include \"(${forbidden})")
    foreach(line IN LISTS includes)
      list(APPEND violations "${source}: ${line}")
    endforeach()
  endforeach()
endforeach()
# The lines of the files named after `pattern` that match it are violations.
function(forbid_lines pattern)
  foreach(source IN LISTS ARGN)
    file(STRINGS "${source}" lines REGEX "${pattern}")
    foreach(line IN LISTS lines)
      list(APPEND violations "${source}: ${line}")
    endforeach()
  endforeach()
  set(violations "${violations}" PARENT_SCOPE)
endfunction()
file(GLOB_RECURSE device_sources "${SOURCE_DIR}/kernels/*.cu" "${SOURCE_DIR}/kernels/*.cuh")
forbid_lines("^#include [\"<](absl/|google/protobuf)" ${device_sources})
# Calibration's GPU parts live in calibrate/cuda/, which CMake builds only with CUDA: the rest of calibrate/ neither
# includes the GPU's rooms nor asks whether CUDA is there.
file(GLOB calibrate_sources "${SOURCE_DIR}/calibrate/*.h" "${SOURCE_DIR}/calibrate/*.cc")
forbid_lines("^#(include \"(kernels|runtime)/cuda/|if.*KVPLAN_WITH_CUDA)" ${calibrate_sources})
if(violations)
  list(JOIN violations "\n" message)
  message(FATAL_ERROR "layering violations:\n${message}")
endif()
message(STATUS "layering: every room includes only the rooms below it")
