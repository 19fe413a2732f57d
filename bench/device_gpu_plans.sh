# GPU plan execution (issue 7): the GPU tests, then every carried plan (named FIXTURE-RECIPE.kvplan, FIXTURE
# 6m or 16l) and the full cache evaluated on the CUDA runtime with the full protocol (timed), and the same plans
# on both runtimes with a reduced protocol (16K tokens, 10 needle trials per length) to compare GPU with the CPU
# reference under one protocol. CPU jobs run single-threaded in parallel on the device's cores.
# Usage: bash bench/device_gpu_plans.sh [FIXTURES...]   (default: 6m 16l)
source bench/device_setup.sh
mkdir -p $OUT/gpu $OUT/cpu
/tmp/kv/bin/cuda_model_test 2>&1 | tee $OUT/cuda_model_test.log | grep -E "worst|OK|FAILED|PASSED"
fixtures=${@:-6m 16l}
protocol() {  # fixture -> model directory, full-protocol tokens, then the flags both protocols share
  case $1 in
    6m) echo "/tmp/kv/shared/models/llama-dev-6m 65536 --window 2048 --needle-lengths 512,1024,2048" ;;
    16l) echo "/tmp/kv/shared/models/llama-dev-16l 131072 --window 4096 --needle-lengths 1024,2048,4096" ;;
  esac
}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
for fixture in $fixtures; do
  set -- $(protocol $fixture)
  model=$1; shift 2
  for plan in full $(ls /tmp/kv/plans | grep "^$fixture-" | sed 's/.kvplan//'); do
    flag=""; [ $plan != full ] && flag="--plan /tmp/kv/plans/$plan.kvplan"
    name=$plan; [ $plan = full ] && name=$fixture-full
    timeout 560 /tmp/kv/bin/kvplan eval --model $model --data $HELDOUT --device cpu $flag "$@" --max-tokens 16384 \
      --needle-trials 10 --json $OUT/cpu/$name.json > /tmp/cpu_$name.log 2>&1 &
  done
done
gpu_eval() {  # fixture plan: both protocols on the GPU, the full one timed
  local fixture=$1 plan=$2
  set -- $(protocol $fixture)
  local model=$1 tokens=$2; shift 2
  local flag="" name=$plan
  [ $plan != full ] && flag="--plan /tmp/kv/plans/$plan.kvplan"
  [ $plan = full ] && name=$fixture-full
  local start=$(date +%s.%N)
  /tmp/kv/bin/kvplan eval --model $model --data $HELDOUT --device cuda $flag "$@" --max-tokens $tokens \
    --json $OUT/gpu/$name.json > /tmp/gpu_$name.log 2>&1
  echo "$name full protocol on the GPU: $(awk "BEGIN {print $(date +%s.%N) - $start}") s" >> $OUT/gpu/wall_times.txt
  /tmp/kv/bin/kvplan eval --model $model --data $HELDOUT --device cuda $flag "$@" --max-tokens 16384 \
    --needle-trials 10 --json $OUT/gpu/$name.reduced.json > /tmp/gpu_reduced_$name.log 2>&1
}
export -f gpu_eval protocol
export HELDOUT OUT
# Three GPU evaluations at a time: one small model leaves the GPU mostly idle.
for fixture in $fixtures; do
  for plan in full $(ls /tmp/kv/plans | grep "^$fixture-" | sed 's/.kvplan//'); do echo "$fixture $plan"; done
done | xargs -P 3 -L 1 bash -c 'gpu_eval $0 $1'
cat $OUT/gpu/wall_times.txt
wait
for f in /tmp/gpu_*.log /tmp/cpu_*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '\['; done > $OUT/logs.txt
for f in $OUT/gpu/*.json $OUT/cpu/*.json; do echo "$f $(cat $f)"; done | sed "s|$OUT/||" | tee $OUT/summary.txt
tar -C $OUT -czf $OUT/all.tar.gz gpu cpu
