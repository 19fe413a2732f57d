# One device call (issue 18, first step): the quantized reader's tiles. The CUDA compressed-kernel and model tests
# (every GPU path against its CPU reference), then decode of the Llama-3-8B shape, dense and int4 (plans/8b-int4.kvplan:
# `kvplan calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 --methods quant --key-bits 4
# --value-bits 4 --target-memory 1`) in the same call: batch 1 at 4K and 32K, and the equal-memory batch (70 GB, 32K).
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
run_carried_cuda_tests $OUT
common="--shape llama-3-8b --allow-longer-context --device cuda"
for plan in "" /tmp/kv/plans/8b-int4.kvplan; do
  $K bench $common --context 4096,32768 --steps 32 --no-prefill ${plan:+--plan $plan}
  $K bench $common --context 32768 --steps 16 --fit-memory 70 ${plan:+--plan $plan}
done 2>&1 | grep -v '^\s*$' | tee $OUT/bench.log
