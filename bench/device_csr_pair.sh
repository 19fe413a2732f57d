# One device call (issue 7): after coding a layer's keys and values in one pursuit launch. GPU tests, the kernel
# bench's pursuit table, and the CSR plans' decode at the Llama-3-8B shape (batch 1, 4K and 32K).
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
[ -n "${SKIP_KERNELS:-}" ] || for test in cuda_compressed_test cuda_model_test; do
  /tmp/kv/bin/$test > $OUT/$test.log 2>&1; echo "$test: $(tail -1 $OUT/$test.log)"
done
[ -n "${SKIP_KERNELS:-}" ] || /tmp/kv/bin/kernel_bench 4096 2>&1 | tee $OUT/kernel_bench.log | tail -8
for name in csr 10x; do
  $K calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 -o /tmp/8b-$name.kvplan \
    --methods $([ $name = csr ] && echo dict || echo dict,budget) --key-coding post-rope \
    --target-memory $([ $name = csr ] && echo 0.2 || echo 0.1) > /dev/null
  echo "== plan $name"; $K bench --shape llama-3-8b --device cuda --context 4096,32768 --allow-longer-context --plan /tmp/8b-$name.kvplan
done 2>&1 | grep -vE '^\s*$' | tee $OUT/8b.log
