# One device call (issue 8): the calibration statistics kernels' and GPU calibration tests, the fixtures with every
# method on the GPU, then the Llama-3-8B shape calibrated with every method on random token ids (32 x 2048 tokens,
# 4,096 atoms).
source bench/device_setup.sh
source bench/calibration_runs.sh
for test in cuda_statistics_test cuda_calibrate_test cuda_model_test; do
  /tmp/kv/bin/$test > $OUT/$test.log 2>&1; echo "$test: $(tail -1 $OUT/$test.log)"
done
for fixture in 6m 16l; do calibrate cuda $fixture share,dict,budget,refresh 0-15; done | tee $OUT/fixtures.log
start=$(date +%s.%N)
OMP_NUM_THREADS=16 timeout 500 $K calibrate --shape llama-3-8b --random-tokens --sequences 32 \
  --sequence-length 2048 --atoms 4096 --methods share,dict,budget,refresh --device cuda -o /tmp/8b-all.kvplan \
  > $OUT/8b-calibrate.log 2>&1
echo "8b all methods rc=$? wall $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s"
tr '\r' '\n' < $OUT/8b-calibrate.log | grep -E "^calibrated on|target|x$" | tail -4
