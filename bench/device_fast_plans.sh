# Device calls of issue 18's second step: the quantized reader's arithmetic (the range applied once per entry, levels
# converted as biased floats, each lane finishing one query head's logit) and the tensor-core prefill of the full
# cache (kernels/cuda/flash_attention.cu). MODE=check: the CUDA tests and a first look at the speed of this build;
# MODE=table: the same tests, then this build (kvplan) against the one before it (kvplan-before) and transformers'
# sdpa prefill, one call.
# Llama-3-8B shape, random weights; plans/8b-int4.kvplan from `kvplan calibrate --shape llama-3-8b
# --reference-context 32768 --exempt-layers -1 --methods quant --key-bits 4 --value-bits 4 --target-memory 1`.
source bench/device_setup.sh
common="--shape llama-3-8b --allow-longer-context --device cuda"
int4=/tmp/kv/plans/8b-int4.kvplan
speed() {  # speed BINARY: dense decode and prefill, int4 decode, int4 at equal memory
  echo "== $(basename $1): dense, decode and prefill"
  $1 bench $common --context 4096,32768 --steps 32 --repetitions 2
  echo "== $(basename $1): int4 decode"
  $1 bench $common --context 4096,32768 --steps 32 --repetitions 2 --no-prefill --plan $int4
  echo "== $(basename $1): int4, equal memory (70 GB)"
  $1 bench $common --context 32768 --steps 16 --repetitions 2 --fit-memory 70 --plan $int4
}
run_carried_cuda_tests $OUT | tee $OUT/tests.log
if [ "${MODE:-check}" = check ]; then
  speed /tmp/kv/bin/kvplan 2>&1 | grep -v '^\s*$' | tee $OUT/bench.log
  exit
fi
{
  speed /tmp/kv/bin/kvplan
  speed /tmp/kv/bin/kvplan-before
  echo "== kvplan: dense, equal memory (70 GB)"
  /tmp/kv/bin/kvplan bench $common --context 32768 --steps 16 --repetitions 2 --fit-memory 70
  echo "== transformers $(python3 -c 'import transformers; print(transformers.__version__)'): sdpa prefill"
  python3 bench/hf_reference.py prefill llama-3-8b 4096,32768
} 2>&1 | grep -v '^\s*$' | tee $OUT/bench.log
