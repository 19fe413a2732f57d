# One device call: the tensor-core prefill at 64 rows per block (kvplan, kFlashRows 64) against 128 rows
# (kvplan-128, the same tree with kFlashRows 128), dense Llama-3-8B shape, prompts of 4K and 32K, one after the other;
# then the kernel's own time over a 32K prefill under ncu (64 rows), to split the prefill between attention and the rest.
source bench/device_setup.sh
common="--shape llama-3-8b --allow-longer-context --device cuda --steps 1 --repetitions 1"
for bin in kvplan kvplan-128 kvplan; do
  echo "== $bin"
  /tmp/kv/bin/$bin bench $common --context 4096,32768
done 2>&1 | grep -v '^\s*$' | tee $OUT/bench.log
ncu --kernel-name regex:flash_attention_kernel --metrics gpu__time_duration.sum --csv \
  /tmp/kv/bin/kvplan bench $common --context 32768 > $OUT/ncu_flash_32k.csv 2> $OUT/ncu_flash_32k.err
python3 bench/ncu_summary.py $OUT/ncu_flash_32k.csv 5 | tee $OUT/ncu_flash_32k.txt
