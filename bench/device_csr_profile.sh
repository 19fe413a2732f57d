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
  python3 - $OUT/ncu-$name.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
header = rows[0]; rows = rows[1:]
k = header.index("Kernel Name"); v = header.index("Metric Value"); u = header.index("Metric Unit")
total = collections.defaultdict(float); count = collections.Counter()
for r in rows:
    value = float(r[v].replace(",", "")) * (1e-3 if r[u] == "nsecond" else 1.0 if r[u] == "usecond" else 1e3)
    name = r[k].split("(")[0][:70]; total[name] += value; count[name] += 1
s = sum(total.values())
print(f"{len(rows)} kernels, {s:.0f} us")
for name, t in sorted(total.items(), key=lambda x: -x[1])[:25]:
    print(f"{t:10.1f} us {count[name]:5d}x {t/count[name]:8.2f} us  {name}")
PY
}
for name in csr 10x; do echo "== $name"; profile $name --plan /tmp/8b-$name.kvplan; done
echo "== dense"; profile dense
