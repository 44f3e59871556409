#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build for sm_90a, run the CPU and GPU test suites, the
# GPU suites under compute-sanitizer (memcheck, racecheck) on reduced shapes, and the demo.
# Stages: build test sanitize bench demo (default: all), and three more for performance work:
# targets (only the rows the decode targets judge: CSA layer and HCA decode steps), timelines
# (a -DDSV4_FUSED_TIMELINE build's phase stamps for the rows in $TIMELINE_ROWS) and profile
# (Nsight Compute on one kernel, $PROFILE_KERNEL, of one row, $PROFILE_ROW).
# $DSV4_COMMIT names the tree in the log and the bench JSON (a copied tree's .git may be stale).
# $BUILD_DIR (default build-device): where the build stage builds and the others find the
# binaries; binaries built on another machine (scripts/build-for-device.sh, carried) serve
# when the build stage is left out.
# $SANITIZE_FILTER (a gtest filter) and $SANITIZE_TOOLS (memcheck racecheck) narrow the
# sanitize stage to what a change touched.
# Output in $OUT (or out/): summary.txt, the JSON/SVG/markdown results, timelines.txt,
# profile.ncu-rep, profile.txt and profile-stalls.txt (scripts/stall-summary.py), and every
# log packed into logs.tgz at exit (the device tool returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
pack_logs() { tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"; }
trap pack_logs EXIT
stages=${*:-build test sanitize bench demo}
BUILD_DIR=${BUILD_DIR:-build-device}
# Binaries built elsewhere (scripts/build-for-device.sh; run without the build stage): the
# CLI tests run this tree's tool, and the CUDA libraries load from the toolkit.
case $BUILD_DIR in /*) export DSV4_CLI=$BUILD_DIR/dsv4-compressor ;; *) export DSV4_CLI=$PWD/$BUILD_DIR/dsv4-compressor ;; esac
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
status=0
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

for stage in $stages; do
  case $stage in
    build)
      log "build $(date -u +%FT%TZ) ${DSV4_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
      cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90a-real >"$LOGS/build.log" 2>&1 &&
        cmake --build "$BUILD_DIR" >>"$LOGS/build.log" 2>&1 || { log "build FAILED"; tail -30 "$LOGS/build.log"; exit 1; }
      ;;
    test)
      "$BUILD_DIR"/tests/dsv4_cuda_tests >"$LOGS/cuda_tests.log" 2>&1; rc=$?
      log "dsv4_cuda_tests rc=$rc: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$LOGS/cuda_tests.log" | tr '\n' ' ')"
      grep -E "relative L2|vs solo|running kv|GPU soak|vs unfused|FAILED|Failure" "$LOGS/cuda_tests.log" | head -80
      [ $rc -eq 0 ] || status=1
      "$BUILD_DIR"/tests/dsv4_tests >"$LOGS/cpu_tests.log" 2>&1; rc=$?
      log "dsv4_tests rc=$rc: $(grep -E '^\[  (PASSED|FAILED) ' "$LOGS/cpu_tests.log" | tr '\n' ' ')"
      [ $rc -eq 0 ] || status=1
      ;;
    sanitize)
      filter='CudaRunning.*:CudaSlicedProjection.*:CudaHostileValues.*:CudaSoak.*:CudaGroup.*:*CudaVsCpu*Flash_CsaMain_Scoref32_Statef32*:*CudaVsCpu*Flash_CsaIndexer_Scoref32_Statebf16*:*CudaVsCpu*Flash_Hca_Scorebf16_Statebf16*:*CudaSplitInvariant*Flash_CsaMain_Scorebf16_Statef32*:CudaGraph.*:*CudaFused*Flash_CsaMain_Scorebf16_Statef32*:*CudaFused*Flash_Hca_Scoref32_Statebf16*:CudaFusedGroup.*:CudaFusedWide.*:CudaCompressStep.*'
      filter=${SANITIZE_FILTER:-$filter}  # a call may narrow it to what it changed
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        # Racecheck is slow per launch: the long serving tests of the sliced projection and the
        # compress step run under memcheck only, their short ones under both.
        tool_filter=$filter
        if [ $tool = racecheck ]; then
          case $filter in *-*) tool_filter="$filter:" ;; *) tool_filter="$filter-" ;; esac
          tool_filter+=CudaSlicedProjection.RunningStepsMatchFusedStepBitForBit:CudaCompressStep.OneLaunchMatchesPerStageKernelsBitForBit
        fi
        DSV4_TEST_SMALL=1 compute-sanitizer --tool $tool --error-exitcode 99 \
          "$BUILD_DIR"/tests/dsv4_cuda_tests --gtest_filter="$tool_filter" >"$LOGS/sanitizer_$tool.log" 2>&1; rc=$?
        log "compute-sanitizer $tool rc=$rc: $(grep -E 'ERROR SUMMARY|HAZARD|^\[  (PASSED|FAILED) ' "$LOGS/sanitizer_$tool.log" | tr '\n' ' ')"
        # racecheck reports hazards inside cuBLASLt's own kernels (nvjet_*, met at hidden 512);
        # they are listed, and only hazards in the library's kernels or a failed test count.
        ours=$(grep -E '^========= (Error|Warning): ' "$LOGS/sanitizer_$tool.log" | grep -vc 'nvjet_')
        if [ $tool = racecheck ] && [ $rc -eq 99 ] && [ "$ours" -eq 0 ] && grep -q '^\[  PASSED  \]' "$LOGS/sanitizer_$tool.log" &&
          ! grep -q '^\[  FAILED  \]' "$LOGS/sanitizer_$tool.log"; then
          log "racecheck: every hazard reported is in cuBLASLt's kernels: $(grep -E '^========= (Error|Warning): ' "$LOGS/sanitizer_$tool.log" | sed 's/+0x[0-9a-f]*//g' | sort -u | tr '\n' ' ')"
          rc=0
        fi
        [ $rc -eq 0 ] || status=1
      done
      ;;
    bench)
      "$BUILD_DIR"/dsv4-compressor bench --json "$OUT/bench.json" --svg "$OUT/bench.svg" >"$LOGS/bench.log" 2>&1; rc=$?
      cat "$LOGS/bench.log"
      log "bench rc=$rc"
      # Where the decode targets stand in this run (docs/PERF.md).
      [ $rc -eq 0 ] && python3 scripts/decode-targets.py "$OUT/bench.json" >"$OUT/targets.md" 2>&1 &&
        log "targets: $(tail -1 "$OUT/targets.md")"
      [ $rc -eq 0 ] || status=1
      ;;
    targets)
      # The rows the decode targets judge (CSA layer and HCA, every decode batch) in one run,
      # against one floor: the top table of docs/PERF.md in a few minutes, not the full bench's.
      "$BUILD_DIR"/dsv4-compressor bench --filter 'HCA decode|CSA layer decode' --json "$OUT/targets.json" \
        >"$LOGS/targets.log" 2>&1; rc=$?
      log "targets bench rc=$rc"
      [ $rc -eq 0 ] && python3 scripts/decode-targets.py "$OUT/targets.json" >"$OUT/targets.md" 2>&1 &&
        log "targets: $(tail -1 "$OUT/targets.md")"
      [ $rc -eq 0 ] || status=1
      ;;
    timelines)
      # Phase stamps (docs/PERF.md's timelines): a second build with -DDSV4_FUSED_TIMELINE=ON,
      # then one bench row at a time with both stamp files asked for; HCA rows past 8 tokens
      # stamp the sliced projection and the running step, the others the fused kernel.
      TL_DIR=${TIMELINE_BUILD_DIR:-build-timeline}
      cmake -S . -B "$TL_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON -DDSV4_FUSED_TIMELINE=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90a-real >"$LOGS/build-timeline.log" 2>&1 &&
        cmake --build "$TL_DIR" --target dsv4-compressor >>"$LOGS/build-timeline.log" 2>&1 ||
        { log "timeline build FAILED"; status=1; continue; }
      rows=${TIMELINE_ROWS:-flash HCA decode B=32;flash HCA decode B=64;flash HCA decode B=128;pro HCA decode B=64;flash CSA layer decode B=64}
      IFS=';' read -ra row_list <<<"$rows"
      for row in "${row_list[@]}"; do
        name=$(echo "$row" | tr -c 'A-Za-z0-9\n' '_')
        DSV4_STEP_TIMELINE_CSV="$LOGS/step-$name.csv" DSV4_FUSED_TIMELINE_CSV="$LOGS/fused-$name.csv" \
          "$TL_DIR"/dsv4-compressor bench --filter "$row" --batches "${row##*B=}" >>"$LOGS/timelines-bench.log" 2>&1 ||
          { log "timeline row '$row' FAILED"; status=1; continue; }
        { echo "## $row"
          if [ -s "$LOGS/step-$name.csv" ]; then  # (d) took the sliced projection
            python3 scripts/step-timeline.py "$LOGS/step-$name.csv"
          elif [ -s "$LOGS/fused-$name.csv" ]; then  # the first two launched plans: (d)'s consecutive steps
            python3 scripts/fused-timeline.py "$LOGS/fused-$name.csv" | awk '/^plan /{n++} n<=2'
          else
            echo "no stamps: the row ran on no GPU kernel of this build"
          fi
          echo; } >>"$OUT/timelines.txt" 2>&1
      done
      log "timelines: $(grep -c '^## ' "$OUT/timelines.txt") rows in timelines.txt"
      ;;
    profile)
      # Nsight Compute on one kernel of one bench row ($PROFILE_ROW, $PROFILE_KERNEL: a regex of
      # kernel names): the full section set of one launch after the warm-up, stall reasons per
      # source line included. Kernels run one at a time under ncu (no overlap between launches),
      # so its durations are not the bench's; what it tells is where a kernel's own time goes.
      # Caches are not flushed between passes and clocks not locked, as in the bench (with the
      # flush, instruction fetch led the stall samples of a warm kernel; docs/PERF.md).
      row=${PROFILE_ROW:-flash HCA decode B=64}
      kernel=${PROFILE_KERNEL:-slice_projection}
      timeout 300 ncu --kernel-name "regex:$kernel" --launch-skip 20 --launch-count 1 --set full \
        --cache-control none --clock-control none -f -o "$OUT/profile" \
        "$BUILD_DIR"/dsv4-compressor bench --filter "$row" --batches "${row##*B=}" >"$LOGS/profile.log" 2>&1; rc=$?
      if [ $rc -eq 0 ] && [ -s "$OUT/profile.ncu-rep" ]; then
        ncu --import "$OUT/profile.ncu-rep" --page details >"$OUT/profile.txt" 2>&1
        ncu --import "$OUT/profile.ncu-rep" --page source --csv --print-source sass >"$LOGS/profile-source.csv" 2>&1
        python3 scripts/stall-summary.py "$LOGS/profile-source.csv" >"$OUT/profile-stalls.txt" 2>&1
        log "profile '$row' ($kernel): $(grep -cE '^ +[A-Z]' "$OUT/profile.txt") lines in profile.txt"
      else
        log "profile '$row' ($kernel) FAILED rc=$rc"; tail -20 "$LOGS/profile.log"; status=1
      fi
      ;;
    demo)
      "$BUILD_DIR"/dsv4-compressor demo --device cuda >"$LOGS/demo.log" 2>&1; rc=$?
      cat "$LOGS/demo.log"
      log "demo rc=$rc"
      [ $rc -eq 0 ] || status=1
      ;;
  esac
done
cat "$OUT/summary.txt"
exit $status
