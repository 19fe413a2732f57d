# One device call (issue 8): the Llama-3-8B shape calibrated with every method on random token ids, 32 x 2048
# tokens, 4,096 atoms (GPU, cores 0-7); meanwhile on cores 8-15 the CPU reference calibrates the plans whose
# quality is compared with their GPU-calibrated twins (32K held-out tokens each, evaluated on the GPU).
source bench/device_setup.sh
source bench/calibration_runs.sh
/tmp/kv/bin/cuda_model_test > $OUT/cuda_model_test.log 2>&1; echo "cuda_model_test: $(tail -1 $OUT/cuda_model_test.log)"
(calibrate cpu 6m share,dict,budget,refresh 8-15; calibrate cpu 16l dict 8-15; calibrate cpu 16l share 8-15) \
  > $OUT/cpu.log 2>&1 &
for fixture in 6m 16l; do for m in dict share share,dict,budget,refresh; do calibrate cuda $fixture $m 0-7; done; done \
  > $OUT/gpu.log 2>&1
start=$(date +%s.%N)
OMP_NUM_THREADS=8 timeout 420 taskset -c 0-7 $K calibrate --shape llama-3-8b --random-tokens --sequences 32 \
  --sequence-length 2048 --atoms 4096 --methods share,dict,budget,refresh --device cuda -o /tmp/8b-all.kvplan \
  > $OUT/8b-calibrate.log 2>&1
echo "8b all methods rc=$? wall $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s"
grep -E "^calibrated on|target|reduction" $OUT/8b-calibrate.log | tail -3
wait
cat $OUT/gpu.log $OUT/cpu.log
for pair in "6m share+dict+budget+refresh" "16l dict" "16l share"; do set -- $pair
  for device in cuda cpu; do evaluate $device-$1-$2 $1; done
done | tee $OUT/eval.log
