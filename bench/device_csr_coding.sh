# One device call (issue 7): after the cluster matching pursuit. GPU tests; the kernel bench (attention and the
# pursuit); CSR plans at the Llama-3-8B shape (decode at batch 1, throughput of the 10x plan at 70 GB); one CSR
# decode step's kernels under ncu without cache flushes or clock locks.
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
for test in cuda_compressed_test cuda_kernels_test cuda_model_test; do
  /tmp/kv/bin/$test > $OUT/$test.log 2>&1; echo "$test: $(tail -1 $OUT/$test.log)"
done
/tmp/kv/bin/kernel_bench ${KERNEL_CONTEXTS:-4096 32768} 2>&1 | tee $OUT/kernel_bench.log | tail -9
for name in csr 10x; do
  $K calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 -o /tmp/8b-$name.kvplan \
    --methods $([ $name = csr ] && echo dict || echo dict,budget) --key-coding post-rope \
    --target-memory $([ $name = csr ] && echo 0.2 || echo 0.1) > /dev/null
done
(
  for name in csr 10x; do
    echo "== plan $name"; $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 4096,32768 --plan /tmp/8b-$name.kvplan
  done
  echo "== plan 10x, 70 GB"
  $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 32768 --steps 16 --fit-memory 70 --plan /tmp/8b-10x.kvplan
) 2>&1 | grep -vE '^\s*$' | tee $OUT/8b.log
timeout 150 ncu --metrics gpu__time_duration.sum --csv --cache-control none --clock-control none \
  --launch-skip 2500 --launch-count 700 $K bench --shape llama-3-8b --allow-longer-context --device cuda --context 4096 --steps 4 \
  --no-cuda-graphs --plan /tmp/8b-csr.kvplan > $OUT/ncu-csr.csv 2> $OUT/ncu-csr.err
python3 - $OUT/ncu-csr.csv <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
header, rows = rows[0], rows[1:]
k, v = header.index("Kernel Name"), header.index("Metric Value")
total, count = collections.defaultdict(float), collections.Counter()
for r in rows:
    name = r[k].split("(")[0][:70]; total[name] += float(r[v].replace(",", "")) / 1e3; count[name] += 1
print(f"ncu, CSR plan at 4K: {len(rows)} kernels, {sum(total.values()):.0f} us")
for name, t in sorted(total.items(), key=lambda x: -x[1])[:20]:
    print(f"{t:10.1f} us {count[name]:5d}x {t/count[name]:8.2f} us  {name}")
PY
