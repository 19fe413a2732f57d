# Sourced by the device scripts: unpacks the carried build (binaries, non-system libraries, fixtures).
set -o pipefail
mkdir -p /tmp/kv && tar -C /tmp/kv -xJf ${CARRY:-.device-carry}/carry.tar.xz && nproc
export LD_LIBRARY_PATH=/tmp/kv/lib:${LD_LIBRARY_PATH:-}
export KVPLAN_SHARED_DIR=/tmp/kv/shared
export PYTHONUNBUFFERED=1
MODEL=/tmp/kv/shared/models/llama-dev-6m
HELDOUT=/tmp/kv/shared/data/heldout-git-docs.txt
# run_carried_cuda_tests FOLDER: each carried CUDA test binary, its log in FOLDER and its gtest verdict here.
run_carried_cuda_tests() {
  for test in /tmp/kv/bin/cuda_*_test; do
    [ -x "$test" ] || continue
    $test > $1/$(basename $test).log 2>&1
    echo "$(basename $test): $(grep -E '^\[  (PASSED|FAILED) ' $1/$(basename $test).log | tr '\n' ' ')"
  done
}
