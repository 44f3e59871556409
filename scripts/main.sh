#!/usr/bin/env bash
# Builds and runs the main job: `dsv4-compressor bench`, on the GPU when there is one, else on
# the CPU backend (about a minute). Extra arguments go to the benchmark (e.g. --quick,
# --json FILE, --svg FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec ./"${BUILD_DIR:-build}"/dsv4-compressor bench "$@"
