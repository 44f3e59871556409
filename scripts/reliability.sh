#!/usr/bin/env bash
# The hardening jobs CI runs after the test suite:
#   1. the CPU test suite built with AddressSanitizer and UndefinedBehaviorSanitizer;
#   2. the libFuzzer targets (clang), each from its seed corpus for FUZZ_SECONDS (default 30).
# A crash a fuzzer finds is written to build-fuzz/crash-*; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)

echo "== AddressSanitizer + UndefinedBehaviorSanitizer: CPU test suite"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV4_CUDA=OFF \
  -DDSV4_SANITIZE=address,undefined >/dev/null
cmake --build build-asan --target dsv4_tests dsv4-compressor
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j "$jobs")

echo "== libFuzzer targets"
# clang, its OpenMP runtime and its sanitizer/fuzzer runtimes (libclang-rt).
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/libomp.so >/dev/null 2>&1 ||
   ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    clang libomp-dev libclang-rt-dev >/dev/null
fi
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV4_CUDA=OFF -DBUILD_TESTING=OFF \
  -DCMAKE_CXX_COMPILER=clang++ -DDSV4_FUZZ=ON -DDSV4_SANITIZE=address,undefined >/dev/null
cmake --build build-fuzz --target fuzz_safetensors fuzz_npy fuzz_plan
for target in safetensors npy plan; do
  work=build-fuzz/corpus-$target
  mkdir -p "$work"
  echo "-- fuzz_$target for ${FUZZ_SECONDS:-30} s"
  # One OpenMP thread: the targets make many tiny calls, where thread wake-ups dominate.
  (cd build-fuzz && OMP_NUM_THREADS=1 ./fuzz_$target -max_total_time="${FUZZ_SECONDS:-30}" -timeout=10 -rss_limit_mb=4096 \
    -print_final_stats=1 "corpus-$target" "../fuzz/corpus/$target" 2>&1 | tail -4)
done
echo "reliability: sanitizers and fuzzers clean"
