# One device call (issue 18, groundwork): where an int4 plan's decode step goes at the Llama-3-8B shape, next to dense
# and 5x budgets, at batch 1 and at the equal-memory batch (32K context). First the plain bench rows (CUDA graphs on),
# then kernel durations under ncu (eager launches, `--repetitions 1 --steps 2` after 3 warm-up steps: 5 decode steps,
# the noise fill left out), then the kernels of a 4K int4 prefill. Plans: `kvplan calibrate --shape llama-3-8b
# --reference-context 32768 --exempt-layers -1` with `--methods quant --key-bits 4 --value-bits 4 --target-memory 1`
# and `--methods budget --target-memory 0.2`, carried in plans/.
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
INT4=/tmp/kv/plans/8b-int4.kvplan BUDGET=/tmp/kv/plans/8b-budget.kvplan
common="--shape llama-3-8b --allow-longer-context --device cuda"
for plan in "" $INT4 $BUDGET; do
  $K bench $common --context 4096,32768 --steps 32 --no-prefill ${plan:+--plan $plan}
  $K bench $common --context 32768 --steps 16 --fit-memory 70 ${plan:+--plan $plan}
done 2>&1 | tee $OUT/bench.log
profile() {  # name bench-flags...: decode steps' kernels, per step
  local name=$1; shift
  timeout 240 ncu --metrics gpu__time_duration.sum --csv \
    $K bench $common --steps 2 --repetitions 1 --no-prefill --no-cuda-graphs "$@" > $OUT/ncu-$name.csv 2> $OUT/ncu-$name.err
  echo "== $name"; python3 bench/ncu_summary.py $OUT/ncu-$name.csv 18 5
}
{
  profile dense-b1-32k --context 32768 --batch 1
  profile int4-b1-32k --context 32768 --batch 1 --plan $INT4
  profile int4-b44-32k --context 32768 --batch 44 --plan $INT4
  profile dense-b12-32k --context 32768 --batch 12
  echo "== int4 prefill 4K (first 4000 launches)"
  timeout 200 ncu --metrics gpu__time_duration.sum --csv --launch-count 4000 \
    $K bench $common --context 4096 --steps 1 --repetitions 1 --plan $INT4 > $OUT/ncu-int4-prefill.csv 2> $OUT/ncu-int4-prefill.err
  python3 bench/ncu_summary.py $OUT/ncu-int4-prefill.csv 18
} 2>&1 | tee $OUT/profile.log
