# A/B of one calibration recipe between two kvplan builds (bin/kvplan-before and bin/kvplan, packed by
# pack_device_carry.sh with KVPLAN_BEFORE): each build calibrates its own plan from the same flags (its plan
# format is its own) and evaluates it on the CPU runtime, with the full cache as reference; then the GPU tests.
# Usage: bash bench/device_ab_plans.sh CALIBRATE_FLAGS...   (perplexity over MAX_TOKENS, default 8192; needle
# NEEDLE_TRIALS per length, default 20, at 512 and 1K). Fits one 10-minute device call.
source bench/device_setup.sh
max_tokens=${MAX_TOKENS:-8192}
needle_trials=${NEEDLE_TRIALS:-20}
mkdir -p $OUT/ab
evaluate() {  # build name plan-flag
  local build=$1 name=$2; shift 2
  OMP_NUM_THREADS=3 OPENBLAS_NUM_THREADS=1 timeout 320 /tmp/kv/bin/$build eval --model $MODEL --data $HELDOUT \
    --device cpu --max-tokens $max_tokens --needle-lengths 512,1024 --needle-trials $needle_trials "$@" --json $OUT/ab/$name.json > /tmp/$name.log 2>&1
}
for build in kvplan-before kvplan; do
  (OMP_NUM_THREADS=7 OPENBLAS_NUM_THREADS=1 timeout 240 /tmp/kv/bin/$build calibrate --model $MODEL \
     --data /tmp/kv/shared/data/calib-sample.txt "$@" -o /tmp/$build.kvplan > /tmp/$build.calibrate.log 2>&1 &&
   /tmp/kv/bin/$build inspect /tmp/$build.kvplan > $OUT/ab/$build.inspect.txt &&
   evaluate $build $build --plan /tmp/$build.kvplan) &
done
evaluate kvplan full &
/tmp/kv/bin/cuda_kernels_test 2>&1 | tee $OUT/cuda_kernels_test.log | grep -E "OK|FAILED|PASSED|Skipped"
/tmp/kv/bin/cuda_model_test 2>&1 | tee $OUT/cuda_model_test.log | grep -E "OK|FAILED|PASSED"
wait
for f in /tmp/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '\[' | tail -6; done > $OUT/ab/logs.txt
for f in $OUT/ab/*.json; do echo "$(basename $f) $(cat $f)"; done
