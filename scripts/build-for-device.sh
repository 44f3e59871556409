#!/usr/bin/env bash
# Builds the tool and both test suites for sm_90a on this machine (nvcc, no GPU needed) and
# puts the binaries into DIR (default build-carry/, ignored by git), so that a device call
# carries them instead of building there: a device build takes minutes of the device's
# time, this one none. On the device, point the scripts at them:
#   BUILD_DIR=build-carry scripts/device-check.sh test targets     (no `build` stage)
#   AB_TREE_BIN=build-carry/dsv4-compressor scripts/ab-bench.sh - 2 -- ARGS
# The binaries link cuBLASLt and the CUDA runtime dynamically; device-check.sh and
# ab-bench.sh find them under /usr/local/cuda there.
#
# usage: scripts/build-for-device.sh [DIR]    ($BUILD_DIR: the build tree, default build-sm90a)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-build-carry}
build=${BUILD_DIR:-build-sm90a}
bash scripts/install-deps.sh
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real >/dev/null
cmake --build "$build" --target dsv4-compressor dsv4_tests dsv4_cuda_tests
mkdir -p "$dest/tests"
cp "$build/dsv4-compressor" "$dest/"
cp "$build/tests/dsv4_tests" "$build/tests/dsv4_cuda_tests" "$dest/tests/"
echo "build-for-device: $(git rev-parse --short HEAD 2>/dev/null)$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo '+changes') in $dest/"
