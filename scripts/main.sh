#!/usr/bin/env bash
# Builds and runs the main job: a DeepSeek-V4-Flash-shaped layer's compressors serving a mixed
# batch on random weights, with the split invariant checked. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
tool=./"${BUILD_DIR:-build}"/dsv4-compressor
device=cpu
if "$tool" info | grep -q "GPU present"; then device=cuda; fi
exec "$tool" demo --device "$device" "$@"
