#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: an A/B of several binaries built beforehand (by
# scripts/build-for-device.sh, carried to the device) in one call. Runs `bench BENCH_ARGS`
# with each binary in turn, REPS rounds, so that every label's runs interleave with the
# others' on one machine, then prints scripts/bench-compare.py's table of (d) against the
# first label. A round is not started once $BENCH_ROUNDS_BUDGET_S seconds (default 400) have
# passed, so that a device call's limit leaves room for the steps after it; the table then
# holds the rounds that ran. Runs go to $OUT/rounds/LABEL-rN.json and .log, packed at the end
# into $OUT/rounds.tgz (the device tool brings back only a few files a call), with the table
# also in $OUT/rounds-compare.md.
#
# usage: scripts/bench-rounds.sh [REPS] LABEL=BINARY... -- BENCH_ARGS...
#   e.g. scripts/bench-rounds.sh 2 main=build-carry/main/dsv4-compressor \
#          early=build-carry/early/dsv4-compressor -- --filter 'CSA layer decode' --batches 64,256
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out}
reps=2
if [ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]]; then reps=$1; shift; fi
labels=() bins=()
while [ $# -ge 1 ] && [ "$1" != "--" ]; do
  [[ $1 == *=* ]] || { echo "bench-rounds: expected LABEL=BINARY, got '$1'" >&2; exit 2; }
  labels+=("${1%%=*}") bins+=("${1#*=}")
  [ -x "${1#*=}" ] || { echo "bench-rounds: no executable ${1#*=}" >&2; exit 2; }
  shift
done
if [ ${#labels[@]} -eq 0 ] || [ $# -eq 0 ]; then sed -n '10,12p' "$0"; exit 2; fi
shift  # the --
budget=${BENCH_ROUNDS_BUDGET_S:-400}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT/rounds"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/rounds/device.txt"
start=$(date +%s)
runs=()
for r in $(seq 1 "$reps"); do
  if [ "$r" -gt 1 ] && [ $(($(date +%s) - start)) -ge "$budget" ]; then
    echo "bench-rounds: $((r - 1)) of $reps rounds within ${budget} s"
    break
  fi
  for i in "${!labels[@]}"; do
    t0=$(date +%s)
    json=$OUT/rounds/${labels[$i]}-r$r.json
    if DSV4_COMMIT=${labels[$i]} "${bins[$i]}" bench "$@" --json "$json" >"$OUT/rounds/${labels[$i]}-r$r.log" 2>&1; then
      runs+=("${labels[$i]}=$json")
    else
      echo "bench-rounds: ${labels[$i]} round $r failed:"; tail -5 "$OUT/rounds/${labels[$i]}-r$r.log"
    fi
    echo "bench-rounds: ${labels[$i]} round $r, $(($(date +%s) - t0)) s"
  done
done
[ ${#runs[@]} -ge 1 ] || exit 1
python3 scripts/bench-compare.py "${runs[@]}" | tee "$OUT/rounds/compare.md"
cp "$OUT/rounds/compare.md" "$OUT/rounds-compare.md"
tar czf "$OUT/rounds.tgz" -C "$OUT" rounds && rm -rf "$OUT/rounds"
