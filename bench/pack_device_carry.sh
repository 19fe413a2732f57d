# Packs what the device runs need into .device-carry/carry.tar.xz (git-ignored): the CUDA build's binaries,
# the non-system shared libraries they load (ldd), the fixtures, and plans given as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
mkdir -p $stage/bin $stage/lib $stage/plans $stage/shared/models $stage/shared/data
cp build-cuda/cli/kvplan build-cuda/tests/cuda_kernels_test build-cuda/tests/cuda_model_test build-cuda/bench/kernel_bench $stage/bin/
for binary in $stage/bin/*; do ldd $binary; done | awk '/=>/ {print $1, $3}' | sort -u |
  grep -vE '^(libc\.|libm\.|libpthread|libdl|librt|ld-linux|libcublas|libcuda\.)' | awk '{print $2}' |
  xargs -I{} cp -L {} $stage/lib/
strip $stage/bin/*
cp -r ../shared/models/llama-dev-6m $stage/shared/models/
cp ../shared/data/heldout-git-docs.txt $stage/shared/data/
for plan in "$@"; do cp "$plan" $stage/plans/; done
rm -rf .device-carry && mkdir .device-carry
tar -C $stage -cJf .device-carry/carry.tar.xz bin lib plans shared
rm -rf $stage
du -sh .device-carry
