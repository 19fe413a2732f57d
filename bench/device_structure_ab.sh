# Issue 17 (a restructuring): the GPU tests and the fixtures' perplexities must be identical before and after it.
#   before: bash bench/device_structure_ab.sh before   (the pre-change build carried as bin/kvplan and its tests)
#   after:  bash bench/device_structure_ab.sh after    (the new build, with the plans `before` calibrated in plans/)
#   speed:  bash bench/device_structure_ab.sh speed    (the new build, the old kvplan as bin/kvplan-before, the
#           `before` plans in plans/)
# before/after run the carried CUDA tests, calibrate a fixed set of plans on the GPU for both fixtures with
# bin/kvplan and evaluate each against the full cache (perplexity over 8K held-out tokens in windows of 1K, KL,
# top-1, 10 needle trials at 1K); `after` also evaluates the `before` plans. `speed` times decode of the 16-layer
# fixture with both builds, interleaved, in one call (the carry cap of 64 MiB does not hold both builds, the
# tests and both fixtures at once). Everything lands in $OUT/<mode>.tar.gz.
source bench/device_setup.sh
mode=$1
out=/tmp/ab/$mode
mkdir -p $out
nvidia-smi -L | tee $out/device.txt
data=/tmp/kv/shared/data/calib-sample.txt
# speed carries no tests; a warm machine may still hold the previous call's
[ "$mode" != speed ] && run_carried_cuda_tests $out
plans() {  # binary folder: calibrates the plan set of both fixtures
  local binary=$1 folder=$2
  mkdir -p $folder
  for name in 6m 16l; do
    local model=/tmp/kv/shared/models/llama-dev-$name
    local common="--model $model --data $data --device cuda --sequences 4 --sequence-length 1024"
    $binary calibrate $common --methods quant --key-bits 4 --value-bits 4 --target-memory 1 -o $folder/$name-int4.kvplan > $folder/$name-int4.log 2>&1
    $binary calibrate $common --methods dict,budget --scoring attention --exempt-layers -1 --target-memory 0.2 -o $folder/$name-dict-budget.kvplan > $folder/$name-dict-budget.log 2>&1
    $binary calibrate $common --methods share,budget,refresh --target-memory 0.3 -o $folder/$name-share-budget-refresh.kvplan > $folder/$name-share-budget-refresh.log 2>&1
    $binary calibrate $common --methods optimise --scoring attention --optimiser-sequences 1 --verify-sequences 1 --optimiser-widths 4,2 --optimiser-fractions 0.5,0.25 --target-memory 0.1 -o $folder/$name-optimise.kvplan > $folder/$name-optimise.log 2>&1
  done
}
evaluate() {  # binary plan json
  local model=/tmp/kv/shared/models/llama-dev-$(basename $2 | cut -d- -f1)
  $1 eval --model $model --data $HELDOUT --device cuda --window 1024 --max-tokens 8192 --needle-lengths 1024 \
    --needle-trials 10 --plan $2 --json $3 > $3.log 2>&1
}
if [ "$mode" = speed ]; then
  model=/tmp/kv/shared/models/llama-dev-16l
  for build in kvplan-before kvplan kvplan-before kvplan; do
    for plan in "" /tmp/kv/plans/16l-int4.kvplan /tmp/kv/plans/16l-dict-budget.kvplan; do
      /tmp/kv/bin/$build bench --model $model --device cuda --context 1024,3584 --steps 64 --batch 1 \
        ${plan:+--plan $plan} 2>&1 | grep -v '^\s*$' >> $out/bench-$build.log
    done
  done
else
  plans /tmp/kv/bin/kvplan $out/plans
  for plan in $out/plans/*.kvplan; do evaluate /tmp/kv/bin/kvplan $plan $out/$(basename $plan .kvplan).eval.json; done
fi
if [ "$mode" = after ]; then
  for plan in /tmp/kv/plans/*.kvplan; do
    evaluate /tmp/kv/bin/kvplan $plan $out/before-plan-$(basename $plan .kvplan).eval.json
  done
fi
tar -C /tmp/ab -czf $OUT/$mode.tar.gz $mode
for f in $out/*.eval.json; do echo "$(basename $f) $(python3 -c "import json,sys; r=json.load(open('$f')); print(r['perplexity']['value'], r.get('reference',{}).get('perplexity',{}).get('value'), r.get('kl_divergence',{}).get('mean'), [n['correct'] for n in r.get('needle',[])])" 2>&1)"; done
