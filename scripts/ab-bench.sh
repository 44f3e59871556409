#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: an A/B of the benchmark in one call. Builds BASE (a git
# revision, exported with `git archive` into ab-base/) and the working tree side by side for
# sm_90a, then runs `dsv4-compressor bench ARGS` on each, alternating, REPS times, and prints
# scripts/bench-compare.py's table of (d). Runs go to $OUT/ab-base-rN.json, ab-tree-rN.json.
#
# usage: scripts/ab-bench.sh BASE [REPS] -- BENCH_ARGS...
#   e.g. scripts/ab-bench.sh c183462 2 -- --filter 'HCA decode' --batches 32,64
# BASE may be a directory holding a source tree (e.g. `git archive REV | tar -x -C ab-base`
# here, then carried to the device: a copied tree's .git may lack recent revisions).
# BASE '-' builds the tree once and runs it twice a round: switches read from the
# environment tell the sides apart ($AB_BASE_ENV, $AB_TREE_ENV: VAR=value ..., set for one
# side's runs only). $AB_TREE_BIN and $AB_BASE_BIN name binaries built beforehand
# (scripts/build-for-device.sh), so that the device spends no time building.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
[ $# -ge 1 ] || { sed -n '7,14p' "$0"; exit 2; }
base=$1; shift
reps=2
if [ $# -ge 1 ] && [ "$1" != "--" ]; then reps=$1; shift; fi
[ $# -ge 1 ] && [ "$1" = "--" ] && shift
bench_args=("$@")

configure_and_build() {  # source dir, build dir, log
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a-real \
    >"$3" 2>&1 && cmake --build "$2" --target dsv4-compressor >>"$3" 2>&1
}

start=$(date +%s)
# Binaries built elsewhere (scripts/build-for-device.sh, carried to the device) skip the
# builds: $AB_TREE_BIN for the tree, $AB_BASE_BIN for BASE (not needed with BASE '-').
tree_bin=${AB_TREE_BIN:-build-ab-tree/dsv4-compressor}
build_tree() {
  [ -n "${AB_TREE_BIN:-}" ] && return 0
  configure_and_build . build-ab-tree "$OUT/ab-build-tree.log" || { tail -30 "$OUT/ab-build-tree.log"; return 1; }
}
if [ "$base" = "-" ]; then
  build_tree || exit 1
  base_bin=$tree_bin
elif [ -n "${AB_BASE_BIN:-}" ]; then
  build_tree || exit 1
  base_bin=$AB_BASE_BIN
else
  if [ -d "$base" ]; then
    base_src=$base
  else
    # A copied tree's .git may lack revisions committed after the copy was made.
    git rev-parse --verify -q "$base^{commit}" >/dev/null || { echo "ab-bench: no revision $base here" >&2; exit 2; }
    rm -rf ab-base && mkdir ab-base && git archive "$base" | tar -x -C ab-base
    base_src=ab-base
  fi
  configure_and_build "$base_src" "$base_src/build" "$OUT/ab-build-base.log" &
  base_pid=$!
  build_tree || exit 1
  wait $base_pid || { tail -30 "$OUT/ab-build-base.log"; exit 1; }
  base_bin=$base_src/build/dsv4-compressor
fi
echo "ab-bench: $([ -n "${AB_TREE_BIN:-}" ] && echo "binaries given ($tree_bin, $base_bin)" || echo "built in $(($(date +%s) - start)) s"); base $base, tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
  "$([ -n "$(git status --porcelain 2>/dev/null)" ] && echo '(uncommitted changes)')"

# The JSONs' commit field: BASE, and for the tree $DSV4_COMMIT (a copied tree's .git may be stale).
tree_label="${DSV4_COMMIT:-tree}${AB_TREE_ENV:+ $AB_TREE_ENV}"
if [ "$base" = "-" ]; then base_label="${DSV4_COMMIT:-tree}${AB_BASE_ENV:+ $AB_BASE_ENV}"
elif [ -d "$base" ]; then base_label=${AB_BASE_LABEL:-$base}
else base_label=$base; fi
runs=()
for r in $(seq 1 "$reps"); do
  for side in base tree; do
    if [ $side = base ]; then bin=$base_bin side_env=${AB_BASE_ENV:-} label=$base_label
    else bin=$tree_bin side_env=${AB_TREE_ENV:-} label=$tree_label; fi
    # shellcheck disable=SC2086  # side_env is a list of VAR=value words
    env $side_env DSV4_COMMIT="$label" "$bin" bench "${bench_args[@]}" --json "$OUT/ab-$side-r$r.json" \
      >"$OUT/ab-$side-r$r.log" 2>&1 || { tail -20 "$OUT/ab-$side-r$r.log"; exit 1; }
    runs+=("$OUT/ab-$side-r$r.json")
  done
done
echo "ab-bench: $reps rounds in $(($(date +%s) - start)) s"
python3 scripts/bench-compare.py "${runs[@]}" | tee "$OUT/ab-compare.md"
