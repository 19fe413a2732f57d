# One device call (issue 8): GPU tests, then every calibration method alone and all four together on both
# fixtures, on the GPU (cores 0-7) while the same run on the CPU reference in two lanes of four cores (8-15, cut at
# LIMIT seconds each); then the GPU- and CPU-calibrated all-methods plans evaluated alike (32K tokens, GPU).
source bench/device_setup.sh
source bench/calibration_runs.sh
export LIMIT=${LIMIT:-300}
for test in cuda_calibrate_test cuda_dictionary_learning_test cuda_model_test cuda_compressed_test; do
  /tmp/kv/bin/$test > $OUT/$test.log 2>&1; echo "$test: $(tail -1 $OUT/$test.log)"
done
METHODS="budget refresh dict share share,dict,budget,refresh"
(for m in $METHODS; do calibrate cpu 6m $m 8-11; done) > $OUT/cpu-6m.log 2>&1 &
(for m in budget refresh dict share,dict,budget,refresh; do calibrate cpu 16l $m 12-15; done) > $OUT/cpu-16l.log 2>&1 &
for fixture in 6m 16l; do for m in $METHODS; do calibrate cuda $fixture $m 0-7; done; done | tee $OUT/gpu.log
wait
cat $OUT/cpu-6m.log $OUT/cpu-16l.log
for fixture in 6m 16l; do for device in cuda cpu; do
  evaluate $device-$fixture-share+dict+budget+refresh $fixture; evaluate $device-$fixture-dict $fixture
done; done | tee $OUT/eval.log
for f in /tmp/cuda-*.log /tmp/cpu-*.log; do cp $f $OUT/; done
