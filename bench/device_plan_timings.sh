# One device call (issue 7): the pursuit kernel's tests; CSR plans at the Llama-3-8B shape after the pursuit
# rewrite (decode at batch 1, throughput at 70 GB); the large calibrations (CSR 4096 atoms + attention budgets,
# keys before and after RoPE, and CSR 1024) run on the device's CPUs meanwhile; then every plan of both fixtures
# timed alone on a 32K-token perplexity run, and the full protocol (perplexity + needle) of the plans not
# evaluated before, three at a time.
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
CALIB=/tmp/kv/shared/data/calib-sample.txt
model() { echo /tmp/kv/shared/models/llama-dev-$1; }

/tmp/kv/bin/cuda_compressed_test 2>&1 | tail -3

full() {  # fixture plan: the full protocol
  local fixture=$1 plan=$2
  case $fixture in
    6m) set -- --window 2048 --max-tokens 65536 --needle-lengths 512,1024,2048 ;;
    16l) set -- --window 4096 --max-tokens 131072 --needle-lengths 1024,2048,4096 ;;
  esac
  timeout 400 $K eval --model $(model $fixture) --data $HELDOUT --device cuda --plan /tmp/kv/plans/$fixture-$plan.kvplan \
    "$@" --json /tmp/full-$fixture-$plan.json > /dev/null 2>&1
  echo "$fixture-$plan $(cat /tmp/full-$fixture-$plan.json)" >> $OUT/full.log
}
full 16l all4 &

calibrate() {  # fixture name flags...
  local fixture=$1 name=$2; shift 2
  OMP_NUM_THREADS=3 $K calibrate --model $(model $fixture) --data $CALIB -o /tmp/kv/plans/$fixture-$name.kvplan "$@" \
    > /tmp/calibrate-$fixture-$name.log 2>&1
}
combo="--methods dict,budget --scoring attention --exempt-layers -1 --target-memory 0.2 --atoms 4096 --sequences 32 --epochs 4"
for fixture in 6m 16l; do
  calibrate $fixture combo $combo &
  calibrate $fixture combo-post $combo --key-coding post-rope &
done
calibrate 16l dict --methods dict &

(
  for name in csr 10x; do
    $K calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 -o /tmp/8b-$name.kvplan \
      --methods $([ $name = csr ] && echo dict || echo dict,budget) --key-coding post-rope \
      --target-memory $([ $name = csr ] && echo 0.2 || echo 0.1) > /dev/null
    echo "== plan $name"; $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 4096,32768 --plan /tmp/8b-$name.kvplan
  done
  echo "== plan 10x, 70 GB"
  $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 32768 --steps 16 --fit-memory 70 --plan /tmp/8b-10x.kvplan
) 2>&1 | grep -vE '^\s*$' | tee $OUT/8b.log

timed() {  # fixture plan: a 32K-token perplexity run alone on the GPU
  local fixture=$1 plan=$2 flag="" window=2048
  [ $fixture = 16l ] && window=4096
  [ $plan != full ] && flag="--plan /tmp/kv/plans/$fixture-$plan.kvplan"
  local start=$(date +%s.%N)
  $K eval --model $(model $fixture) --data $HELDOUT --device cuda $flag --skip-needle --window $window \
    --max-tokens 32768 --json /tmp/timing-$fixture-$plan.json > /dev/null 2>&1
  echo "$fixture $plan $(awk "BEGIN {print $(date +%s.%N) - $start}") s $(cat /tmp/timing-$fixture-$plan.json)"
}
for fixture in 6m 16l; do
  for plan in full share budget-l2 budget-att refresh all4 dict-post; do
    [ $plan = full ] || [ -f /tmp/kv/plans/$fixture-$plan.kvplan ] && timed $fixture $plan
  done
done | tee $OUT/timing.log
wait $(jobs -p | tail -n +2)  # the calibrations (the first job is the all-methods evaluation)
for f in /tmp/calibrate-*.log; do echo "$f: $(grep -E 'target' $f | tail -1)"; done
for plan in 6m\ combo 6m\ combo-post 16l\ combo 16l\ combo-post; do full $plan & done
for fixture in 6m 16l; do for plan in dict combo combo-post; do
  [ -f /tmp/kv/plans/$fixture-$plan.kvplan ] && timed $fixture $plan
done; done | tee -a $OUT/timing.log
wait
cat $OUT/full.log
