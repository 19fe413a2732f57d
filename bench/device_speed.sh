# Compressed-cache kernel tests and the decode attention kernel benchmark (dense vs sparse-coded), then the
# plans the 16-job evaluation could not finish, 4 threads each. (transformers speed: bench/hf_reference.py speed.)
source bench/device_setup.sh
/tmp/kv/bin/cuda_kernels_test 2>&1 | tee $OUT/cuda_kernels_test.log | grep -E "OK|FAILED|PASSED"
/tmp/kv/bin/kernel_bench 4096 32768 2>&1 | tee $OUT/kernel_bench.log
export OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=1
run() { timeout 330 /tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT --device cpu --plan /tmp/kv/plans/$1.kvplan "${@:2}"; }
run dict4096 --skip-needle --json /tmp/dict4096.ppl.json > /dev/null 2>&1 &
run dict4096 --skip-perplexity --needle-lengths 512,1024 --json /tmp/dict4096.short.json > /dev/null 2>&1 &
run dict4096 --skip-perplexity --needle-lengths 2048 --json /tmp/dict4096.long.json > /dev/null 2>&1 &
run dict_budget --skip-perplexity --needle-lengths 2048 --json /tmp/dict_budget.long.json > /dev/null 2>&1 &
wait
for f in /tmp/dict*.json; do echo "$(basename $f) $(cat $f)"; done | tee $OUT/plan_evals.log
