# Sourced by the device calibration scripts (after device_setup.sh): one fixture calibration, timed and pinned to
# cores, and one plan's 32K-token perplexity on the GPU. LIMIT (seconds) cuts a calibration; unset, none is cut.
K=/tmp/kv/bin/kvplan
CALIB=/tmp/kv/shared/data/calib-sample.txt
model() { echo /tmp/kv/shared/models/llama-dev-$1; }
calibrate() {  # device fixture methods cores: writes /tmp/<device>-<fixture>-<methods>.kvplan
  local device=$1 fixture=$2 methods=$3 cores=$4 name=$1-$2-${3//,/+}
  local start=$(date +%s.%N)
  OMP_NUM_THREADS=$(( ${cores#*-} - ${cores%-*} + 1 )) timeout ${LIMIT:-0} taskset -c $cores $K calibrate \
    --model $(model $fixture) --data $CALIB --methods $methods --device $device -o /tmp/$name.kvplan \
    > /tmp/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc wall $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s | $(grep -E '^calibrated on' /tmp/$name.log)"
}
evaluate() {  # plan-name fixture
  local window=2048; [ $2 = 16l ] && window=4096
  [ -f /tmp/$1.kvplan ] || return
  $K eval --model $(model $2) --data $HELDOUT --device cuda --plan /tmp/$1.kvplan --skip-needle --no-reference \
    --window $window --max-tokens 32768 --json /tmp/$1.json > /dev/null 2>&1
  echo "$1 $(cat /tmp/$1.json)"
}
