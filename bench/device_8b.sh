# Plans at real scale (issue 7): the Llama-3-8B shape with random weights. Synthetic plans (calibrate --shape:
# random unit atoms, uniform coverage) sized at 32K, then decode speed at batch 1 (4K and 32K), dense with and
# without CUDA graphs and each plan, and throughput at equal memory: the largest batch within 70 GB at 32K.
# Usage: bash bench/device_8b.sh [throughput]   (throughput: only the equal-memory runs)
source bench/device_setup.sh
K=/tmp/kv/bin/kvplan
plan() {  # name flags...
  local name=$1; shift
  $K calibrate --shape llama-3-8b --reference-context 32768 --exempt-layers -1 -o /tmp/8b-$name.kvplan "$@" |
    grep -E "target|32768" | tee $OUT/plan-$name.txt
}
plan 5x-l2 --methods budget --target-memory 0.2
plan 5x-attention --methods budget --scoring attention --target-memory 0.2
plan csr --methods dict --key-coding post-rope --target-memory 0.2
plan 10x --methods dict,budget --key-coding post-rope --target-memory 0.1
bench() { $K bench --shape llama-3-8b --allow-longer-context --device cuda "$@" 2>&1 | grep -vE '^\s*$'; }
if [ "$1" != throughput ]; then
  (
    echo "== dense, CUDA graphs"; bench --context 4096,32768
    echo "== dense, eager launches"; bench --context 4096,32768 --no-cuda-graphs
    for name in 5x-l2 5x-attention csr 10x; do echo "== plan $name"; bench --context 4096,32768 --plan /tmp/8b-$name.kvplan; done
  ) 2>&1 | tee $OUT/decode.log
fi
(
  echo "== dense, 70 GB"; bench --context 32768 --steps 16 --fit-memory 70
  for name in 5x-l2 10x; do
    echo "== plan $name, 70 GB"; bench --context 32768 --steps 16 --fit-memory 70 --plan /tmp/8b-$name.kvplan
  done
) 2>&1 | tee $OUT/throughput.log
