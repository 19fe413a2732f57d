# Every plan's perplexity and needle accuracy on the CPU runtime: one single-threaded job per plan and protocol
# part, all in parallel on the 16 cores.
source bench/device_setup.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
for plan in $(ls /tmp/kv/plans | sed 's/.kvplan//'); do
  flag="--plan /tmp/kv/plans/$plan.kvplan"
  run() { timeout 570 /tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT --device cpu $flag "$@"; }
  run --skip-needle --json /tmp/$plan.ppl.json > /tmp/$plan.ppl.log 2>&1 &
  run --skip-perplexity --needle-lengths 512,1024 --json /tmp/$plan.short.json > /tmp/$plan.short.log 2>&1 &
  run --skip-perplexity --needle-lengths 2048 --json /tmp/$plan.long.json > /tmp/$plan.long.log 2>&1 &
done
wait
for f in /tmp/*.ppl.json /tmp/*.short.json /tmp/*.long.json; do echo "$(basename $f) $(cat $f)"; done | tee $OUT/plan_evals.log
