# Kernel tests (compressed-cache kernels included), full-cache quality on the GPU and its transformers replay,
# and every plan's quality on the CPU runtime, 2 threads per plan, all plans at once on the 16 cores.
source bench/device_setup.sh
/tmp/kv/bin/cuda_kernels_test 2>&1 | tee $OUT/cuda_kernels_test.log | grep -E "OK|FAILED|PASSED"
mkdir -p $OUT/eval
for plan in full $(ls /tmp/kv/plans | sed 's/.kvplan//'); do
  if [ $plan = full ]; then flag=""; else flag="--plan /tmp/kv/plans/$plan.kvplan"; fi
  OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 timeout 530 /tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT \
    --device cpu $flag --json $OUT/eval/$plan.json > /tmp/eval_$plan.log 2>&1 &
done
/tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT --device cuda --json $OUT/eval/full_cuda.json \
  --needle-prompts /tmp/needle_prompts.json 2>&1 | tr '\r' '\n' | grep -v '\[' | tee $OUT/eval_cuda.log
python3 bench/hf_reference.py needle $MODEL /tmp/needle_prompts.json 2>&1 | tail -1 | tee $OUT/hf_needle.log
wait
for f in /tmp/eval_*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '\['; done | tee $OUT/eval_plans.log
