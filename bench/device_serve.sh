# Serving on the GPU: `kvplan serve` on the 6m fixture, with the full cache and with a token-budget plan calibrated
# here, driven by 1, 8 and 32 concurrent streaming clients (bench/serve_load.py): requests/s, output tokens/s, p50/p99
# latency and time to first token. Server logs and final /metrics go to $OUT.
source bench/device_setup.sh
# First, the CUDA runtime's ResetSequence (a sequence reset while another decodes, full cache and a plan).
/tmp/kv/bin/cuda_model_test --gtest_filter='*ResetSequence*' 2>&1 | tee $OUT/cuda_reset_sequence.log |
  grep -E "OK|FAILED|PASSED"
PLAN=/tmp/kv/serve_budget.kvplan
/tmp/kv/bin/kvplan calibrate --model $MODEL --data /tmp/kv/shared/data/calib-sample.txt --target-memory 0.3 \
  --methods budget --exempt-layers -1 --device cuda -q -o $PLAN 2>&1 | tee $OUT/serve_plan.log
/tmp/kv/bin/kvplan inspect $PLAN --context 256 | tee -a $OUT/serve_plan.log
PORT=18080
serve_and_load() {  # name, then kvplan serve flags
  local name=$1
  shift
  /tmp/kv/bin/kvplan serve --model $MODEL --device cuda --port $PORT --max-batch 32 --context 1024 "$@" \
    > $OUT/serve_$name.log 2>&1 &
  local server=$!
  python3 - <<PY
import time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen("http://127.0.0.1:$PORT/health", timeout=1); break
    except OSError:
        time.sleep(0.1)
PY
  python3 bench/serve_load.py --url http://127.0.0.1:$PORT --clients 1 --requests 16 --max-tokens 128 --label "$name warm-up" > /dev/null
  for clients in 1 8 32; do
    python3 bench/serve_load.py --url http://127.0.0.1:$PORT --clients $clients --requests $((clients * 8 > 32 ? clients * 8 : 32)) \
      --max-tokens 128 --label "$name"
  done | tee -a $OUT/serve_load.log
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/metrics').read().decode())" \
    > $OUT/serve_${name}_metrics.txt
  kill $server
  wait $server
}
serve_and_load dense
serve_and_load plan --plan $PLAN
