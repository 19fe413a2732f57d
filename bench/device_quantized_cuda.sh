# Quantized layers on the CUDA runtime (issue 9): the compressed-cache kernels against their CPU references
# (quantize_vectors bit for bit, attention, probabilities, eviction with merging, coding), every plan against the
# CPU plan path (the quantized cases among them), then decode speed of 4- and 2-bit plans beside the full cache on
# the 16-layer fixture. On a failure the tests print the first mismatching word or element and the worst error.
#   bash bench/device_quantized_cuda.sh
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
model=/tmp/kv/shared/models/llama-dev-16l
/tmp/kv/bin/cuda_compressed_test 2>&1 | tee $OUT/cuda_compressed_test.log | grep -v "^\[ *\(RUN\|OK\) *\]" | tail -40
/tmp/kv/bin/cuda_model_test --gtest_filter='CudaPlanTest.*' 2>&1 | tee $OUT/cuda_model_test.log | tail -30
for bits in 4 2; do
  $K calibrate --model $model --data /tmp/kv/shared/data/calib-sample.txt --device cuda --reference-context 4096 \
    --methods quant --key-bits $bits --value-bits $bits --target-memory 1 -o /tmp/int$bits.kvplan \
    > $OUT/calibrate-int$bits.log 2>&1 || tail -5 $OUT/calibrate-int$bits.log
done
$K bench --model $model --device cuda --context 1024,3584 --steps 64 --batch 1 2>&1 | tee $OUT/bench-full.log
for bits in 4 2; do
  $K bench --model $model --device cuda --plan /tmp/int$bits.kvplan --context 1024,3584 --steps 64 --batch 1 2>&1 |
    tee $OUT/bench-int$bits.log
done
