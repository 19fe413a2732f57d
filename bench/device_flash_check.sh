# One device call after the prefill kernel's unmasked tiles (masks only on tiles some row does not see whole, the
# scale folded into the exponent's multiply-add): the CUDA tests, then dense prefill of the Llama-3-8B shape at 4K and
# 32K (three repetitions) and transformers' sdpa prefill in the same call.
source bench/device_setup.sh
run_carried_cuda_tests $OUT | tee $OUT/tests.log
{
  echo "== kvplan: dense prefill"
  /tmp/kv/bin/kvplan bench --shape llama-3-8b --allow-longer-context --device cuda --steps 4 --repetitions 3 \
    --context 4096,32768
  echo "== transformers $(python3 -c 'import transformers; print(transformers.__version__)'): sdpa prefill"
  python3 bench/hf_reference.py prefill llama-3-8b 4096,32768
} 2>&1 | grep -v '^\s*$' | tee $OUT/bench.log
