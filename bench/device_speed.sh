# Decode attention kernels (dense vs sparse-coded) and transformers' decode speed at the Llama-3-8B shape.
source bench/device_setup.sh
/tmp/kv/bin/kernel_bench 4096 32768 2>&1 | tee $OUT/kernel_bench.log
python3 bench/hf_reference.py speed llama-3-8b 4096,32768 2>&1 | grep '^{' | tee $OUT/hf_speed.log
