# Packs what the device runs need into .device-carry/carry.tar.xz (git-ignored): the CUDA build's binaries,
# the non-system shared libraries they load (ldd), the fixtures, and plans given as arguments.
# CARRY names the folder it writes (default .device-carry; bench/device_setup.sh reads the same variable).
# BUILD names the CUDA build folder (default build-cuda), BINARIES the programs to carry (paths in it); KVPLAN_BEFORE, a kvplan binary of another build to
# carry as bin/kvplan-before (bench/device_ab_plans.sh compares the two).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
mkdir -p $stage/bin $stage/lib $stage/plans $stage/shared/models $stage/shared/data
build=${BUILD:-build-cuda}
# BINARIES: which of the build's programs travel (the carry is capped at 64 MiB with the working tree).
for binary in ${BINARIES:-cli/kvplan tests/cuda_*_test bench/kernel_bench bench/dictionary_bench}; do
  cp $build/$binary $stage/bin/
done
if [ -n "${KVPLAN_BEFORE:-}" ]; then cp "$KVPLAN_BEFORE" $stage/bin/kvplan-before; fi
for binary in $stage/bin/*; do ldd $binary; done | awk '/=>/ {print $1, $3}' | sort -u |
  grep -vE '^(libc\.|libm\.|libpthread|libdl|librt|ld-linux|libcublas|libcuda\.)' | awk '{print $2}' |
  xargs -I{} cp -L {} $stage/lib/
strip $stage/bin/*
if [ "${FIXTURES:-1}" = 1 ]; then  # FIXTURES=0: runs on --shape models need none
  cp -r ../shared/models/llama-dev-6m ../shared/models/llama-dev-16l $stage/shared/models/
  cp ../shared/data/heldout-git-docs.txt ../shared/data/calib-sample.txt $stage/shared/data/
fi
for plan in "$@"; do cp "$plan" $stage/plans/; done
carry=${CARRY:-.device-carry}
rm -rf $carry && mkdir $carry
XZ_OPT=${XZ_OPT:--9 -T2} tar -C $stage -cJf $carry/carry.tar.xz bin lib plans shared
rm -rf $stage
du -sh $carry
