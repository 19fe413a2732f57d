# Issue 9's targets on the H100: plans calibrated on the GPU for both fixtures (quantization alone, the heuristic
# budgets, the quality optimiser at 5x and 10x), each evaluated under one protocol against the full cache of the
# same runtime: perplexity over 32K held-out tokens in windows of the model's context, KL and top-1 agreement,
# and 40 needle trials at a quarter, half and all of the context.
#   bash bench/device_quality.sh [6m|16l] [extra calibrate flags for the optimiser]
# PLANS (default: all) picks which of int4 int2 budget optimise to calibrate; TARGETS the optimiser's targets;
# OPT_SEQUENCES and OPT_SEQUENCE_LENGTH its calibration sequences (default 8 of the model's context).
source bench/device_setup.sh
name=${1:-6m}
shift || true
case $name in
  6m) model=/tmp/kv/shared/models/llama-dev-6m; context=2048 ;;
  16l) model=/tmp/kv/shared/models/llama-dev-16l; context=4096 ;;
esac
data=/tmp/kv/shared/data/calib-sample.txt
out=$OUT/quality-$name
mkdir -p $out
calibrate() {
  local plan=$1
  shift
  local start=$SECONDS
  /tmp/kv/bin/kvplan calibrate --model $model --data $data --device cuda --reference-context $context \
    -o $out/$plan.kvplan "$@" > $out/$plan.calibrate.log 2>&1
  echo "$((SECONDS - start)) s wall" >> $out/$plan.calibrate.log
  /tmp/kv/bin/kvplan inspect $out/$plan.kvplan > $out/$plan.inspect.txt 2>&1
}
plans=${PLANS:-int4 int2 budget optimise}
if [[ $plans == *int4* ]]; then calibrate int4 --methods quant --key-bits 4 --value-bits 4 --target-memory 1; fi
if [[ $plans == *int2* ]]; then calibrate int2 --methods quant --key-bits 2 --value-bits 2 --target-memory 1; fi
if [[ $plans == *budget* ]]; then
  calibrate budget-attn-5x --methods budget --scoring attention --exempt-layers -1 --target-memory 0.2
  calibrate budget-attn-10x --methods budget --scoring attention --exempt-layers -1 --target-memory 0.1
fi
for target in ${TARGETS:-0.2 0.1}; do
  [[ $plans == *optimise* ]] || break
  calibrate optimise-$target --methods optimise --scoring attention --sequences ${OPT_SEQUENCES:-8} \
    --sequence-length ${OPT_SEQUENCE_LENGTH:-$context} --target-memory $target "$@"
done
for plan in $(ls $out/*.kvplan | xargs -n1 basename | sed 's/.kvplan//'); do
  start=$SECONDS
  /tmp/kv/bin/kvplan eval --model $model --data $HELDOUT --device cuda --plan $out/$plan.kvplan --window $context \
    --max-tokens 32768 --needle-lengths $((context / 4)),$((context / 2)),$context \
    --needle-trials 40 --json $out/$plan.eval.json > $out/$plan.eval.log 2>&1
  echo "$((SECONDS - start)) s wall" >> $out/$plan.eval.log
  echo "== $plan"; grep -v "\[#" $out/$plan.eval.log
done
tar -C $OUT -czf $OUT/quality-$name.tar.gz quality-$name && rm -rf $out
