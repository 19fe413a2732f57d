# bench's repetitions, prefill timing and --json on the GPU (issue 11 part 5): the fixture at short contexts and
# the 8B shape (random weights) at 4K and 32K, the full cache and, where the carry holds it, the 8B plan.
# Pack with `bash bench/pack_device_carry.sh [8b.kvplan]` from a CUDA build first.
source bench/device_setup.sh
/tmp/kv/bin/kvplan --version | tee $OUT/version.log
/tmp/kv/bin/kvplan bench --model $MODEL --context 512,2000 --steps 32 --repetitions 5 --device cuda --json \
  | tee $OUT/bench_fixture.json
/tmp/kv/bin/kvplan bench --model $MODEL --context 512,2000 --steps 32 --repetitions 5 --device cuda \
  | tee $OUT/bench_fixture.txt
/tmp/kv/bin/kvplan bench --shape llama-3-8b --allow-longer-context --context 4096,32768 --device cuda --json \
  | tee $OUT/bench_8b.json
if [ -f /tmp/kv/plans/8b.kvplan ]; then
  /tmp/kv/bin/kvplan bench --shape llama-3-8b --allow-longer-context --context 32768 --plan /tmp/kv/plans/8b.kvplan \
    --device cuda --json | tee $OUT/bench_8b_plan.json
fi
