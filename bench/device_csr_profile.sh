# One device call (issue 7): where a CSR plan's decode step goes at the Llama-3-8B shape. Kernel durations of
# decode steps under ncu (eager launches), CSR-only and CSR + budgets plans, then dense for comparison.
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
which ncu || ls /usr/local/cuda*/bin/ncu
for name in csr 10x; do
  $K calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 -o /tmp/8b-$name.kvplan \
    --methods $([ $name = csr ] && echo dict || echo dict,budget) --key-coding post-rope \
    --target-memory $([ $name = csr ] && echo 0.2 || echo 0.1) > /dev/null
done
profile() {  # name plan-flags...: one decode step's kernels at 4K, after warm-up
  local name=$1; shift
  timeout 200 ncu --metrics gpu__time_duration.sum --csv --launch-skip ${SKIP:-2500} --launch-count ${COUNT:-700} \
    $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 4096 --steps 4 --no-cuda-graphs "$@" > $OUT/ncu-$name.csv 2> $OUT/ncu-$name.err
  python3 bench/ncu_summary.py $OUT/ncu-$name.csv
}
for name in csr 10x; do echo "== $name"; profile $name --plan /tmp/8b-$name.kvplan; done
echo "== dense"; profile dense
