# `kvplan sweep` on the GPU (calibration and evaluation with --device cuda): presets x memory targets on
# llama-dev-6m at a 2K context, each against the full cache. Not yet run: the first run also tells whether the
# default grid fits one 10-minute device call (the timeout keeps it inside; shrink the grid if it hits).
# Usage: bash bench/device_sweep.sh [METHODS] [TARGETS]; writes $OUT/sweep/sweep.{csv,svg,log}.
source bench/device_setup.sh
methods=${1:-budget-l2,budget-attn,csr+budget,share,all}
targets=${2:-0.5,0.25,0.2,0.1}
mkdir -p $OUT/sweep
timeout 570 /tmp/kv/bin/kvplan sweep --model $MODEL --calibration-data /tmp/kv/shared/data/calib-sample.txt \
  --eval-data $HELDOUT --methods $methods --targets $targets --context 2048 --max-tokens 16384 --needle-trials 20 \
  --device cuda -o $OUT/sweep/sweep.csv --svg $OUT/sweep/sweep.svg 2> /tmp/sweep.progress | tee $OUT/sweep/sweep.log
tr '\r' '\n' < /tmp/sweep.progress | grep -E '\] [0-9]+/[0-9]+ .*s +$|error|interrupted' > $OUT/sweep/stages.log
