#!/usr/bin/env bash
# Builds and runs the main job: a DeepSeek-V4-Flash-shaped layer's compressors serving a mixed
# batch on random weights, with the split invariant checked. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec ./"${BUILD_DIR:-build}"/dsv4-compressor demo "$@"
