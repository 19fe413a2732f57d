# Full-cache quality on the GPU runtime and its transformers replay, then decode speed at real scale.
source bench/device_setup.sh
/tmp/kv/bin/kvplan eval --model $MODEL --data $HELDOUT --device cuda --json $OUT/eval_cuda.json \
  --needle-prompts /tmp/needle_prompts.json 2>&1 | tr '\r' '\n' | grep -v '\[' | tee $OUT/eval_cuda.log
python3 bench/hf_reference.py needle $MODEL /tmp/needle_prompts.json 2>&1 | tail -1 | tee $OUT/hf_needle.log
(
  /tmp/kv/bin/kvplan bench --model $MODEL --context 512,2000 --device cuda
  /tmp/kv/bin/kvplan bench --shape llama-3-8b --allow-longer-context --context 4096,32768 --batch 1 --device cuda
  /tmp/kv/bin/kvplan bench --shape llama-3-8b --allow-longer-context --context 4096 --batch 16 --device cuda
  python3 bench/hf_reference.py speed llama-3-8b 4096,32768 2>&1 | grep '^{'
) 2>&1 | tee $OUT/bench.log
