# One device call (issue 8): GPU tests, then every calibration method alone and all four together on both
# fixtures, on the GPU (cores 0-7) while the same run on the CPU reference in two lanes of four cores (8-15, cut at
# LIMIT seconds each); then the GPU- and CPU-calibrated all-methods plans evaluated alike (32K tokens, GPU).
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
CALIB=/tmp/kv/shared/data/calib-sample.txt
LIMIT=${LIMIT:-300}
model() { echo /tmp/kv/shared/models/llama-dev-$1; }
for test in cuda_calibrate_test cuda_dictionary_learning_test cuda_model_test cuda_compressed_test; do
  /tmp/kv/bin/$test > $OUT/$test.log 2>&1; echo "$test: $(tail -1 $OUT/$test.log)"
done
calibrate() {  # device fixture methods cores
  local device=$1 fixture=$2 methods=$3 cores=$4 name=$1-$2-${3//,/+}
  local start=$(date +%s.%N)
  OMP_NUM_THREADS=$(( ${cores#*-} - ${cores%-*} + 1 )) timeout $LIMIT taskset -c $cores $K calibrate \
    --model $(model $fixture) --data $CALIB --methods $methods --device $device -o /tmp/$name.kvplan \
    > /tmp/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc wall $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s | $(grep -E '^calibrated on' /tmp/$name.log)"
}
METHODS="budget refresh dict share share,dict,budget,refresh"
(for m in $METHODS; do calibrate cpu 6m $m 8-11; done) > $OUT/cpu-6m.log 2>&1 &
(for m in budget refresh dict share,dict,budget,refresh; do calibrate cpu 16l $m 12-15; done) > $OUT/cpu-16l.log 2>&1 &
for fixture in 6m 16l; do for m in $METHODS; do calibrate cuda $fixture $m 0-7; done; done | tee $OUT/gpu.log
wait
cat $OUT/cpu-6m.log $OUT/cpu-16l.log
evaluate() {  # plan-name fixture
  local window=2048; [ $2 = 16l ] && window=4096
  [ -f /tmp/$1.kvplan ] || return
  $K eval --model $(model $2) --data $HELDOUT --device cuda --plan /tmp/$1.kvplan --skip-needle --no-reference \
    --window $window --max-tokens 32768 --json /tmp/$1.json > /dev/null 2>&1
  echo "$1 $(cat /tmp/$1.json)"
}
for fixture in 6m 16l; do for device in cuda cpu; do
  evaluate $device-$fixture-share+dict+budget+refresh $fixture; evaluate $device-$fixture-dict $fixture
done; done | tee $OUT/eval.log
for f in /tmp/cuda-*.log /tmp/cpu-*.log; do cp $f $OUT/; done
