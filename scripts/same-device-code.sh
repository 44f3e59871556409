#!/usr/bin/env bash
# Does a change leave the GPU code as it was? Compiles every CUDA source of the library and the
# benchmarks at BASE (default HEAD) and in the working tree, for each GPU target of the build
# (sm_90a, sm_80) and also with the diagnostics stamps (DSV4_FUSED_TIMELINE) where a source has them,
# and compares the machine code byte for byte; where a file's machine code differs it compares
# its PTX with internal functions' names masked (they carry a hash of the file's name).
#
# A change whose machine code is identical needs no device run to be trusted (a pure move or
# a comment); anything else must run on the device (docs/TESTING.md). Needs nvcc, not a GPU.
#
#   bash scripts/same-device-code.sh [BASE]      exit 0: identical, 1: differs, 2: cannot tell
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-HEAD}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$nvcc" ] || { echo "same-device-code: no nvcc (set NVCC)"; exit 2; }
git rev-parse --verify -q "$base^{commit}" >/dev/null || { echo "same-device-code: unknown revision $base"; exit 2; }

# Both trees' machine code is compiled at one path, since the names nvcc gives internal
# functions depend on the source's path: BASE first (then moved aside), then the working tree
# (tracked and untracked files that git does not ignore). PTX is made only for the sources
# whose machine code differs.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
flags=(-std=c++20 -O3 -DNDEBUG -DDSV4_HAVE_CUDA=1 --expt-relaxed-constexpr -Iinclude -Isrc -I.)

# nvcc_for DIR VARIANT ARGS...: nvcc in DIR with the flags of one variant.
nvcc_for() {
  local dir=$1 variant=$2 arch extra=()
  shift 2
  case $variant in
    sm_90a) arch=90a ;;
    sm_80) arch=80 ;;
    timeline_sm_90a) arch=90a; extra=(-DDSV4_FUSED_TIMELINE=1) ;;
  esac
  (cd "$dir" && "$nvcc" "${flags[@]}" "${extra[@]}" "${@//ARCH/$arch}")
}
variants_of() {
  case $1 in
    src/cuda/fused_step.cu | src/cuda/running_step.cu | src/cuda/slice_projection.cu) echo sm_90a sm_80 timeline_sm_90a ;;
    *) echo sm_90a sm_80 ;;
  esac
}
key_of() { echo "$1.$2" | tr '/' '_'; }
# compile_tree SIDE: the machine code of every CUDA source of $tree, into $work/SIDE.*; lists
# the sources in $work/SIDE.sources and those that do not compile in $work/SIDE.failed.
compile_tree() {
  (cd "$tree" && ls src/cuda/*.cu bench/*.cu 2>/dev/null) >"$work/$1.sources" || true
  local src v out
  while read -r src; do
    for v in $(variants_of "$src"); do
      out=$work/$1.$(key_of "$src" "$v")
      nvcc_for "$tree" "$v" -gencode "arch=compute_ARCH,code=sm_ARCH" -cubin "$src" -o "$out.cubin" 2>"$out.log" ||
        echo "$src ($v)" >>"$work/$1.failed"
    done
  done <"$work/$1.sources"
}

mkdir -p "$tree"
git archive "$base" | tar -x -C "$tree"
compile_tree a
mv "$tree" "$work/a.tree" && mkdir -p "$tree"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -x -C "$tree"
compile_tree b
# ptx_masked DIR SRC VARIANT OUT: its PTX into OUT with internal functions' names masked (they
# carry a hash of the file's path); fails where nvcc does.
ptx_masked() {
  nvcc_for "$1" "$3" -arch=compute_ARCH -ptx "$2" -o "$4.raw" 2>/dev/null &&
    sed -E 's/_(GLOBAL__N__|INTERNAL_)[0-9a-f]+_[0-9]+_[A-Za-z0-9_]+_cu_[0-9a-f]+/ANON/g' "$4.raw" >"$4" && [ -s "$4" ]
}

status=0
for src in $(sort -u "$work/a.sources" "$work/b.sources"); do
  for v in $(variants_of "$src"); do
    key=$(key_of "$src" "$v")
    if ! grep -qx "$src" "$work/a.sources" || ! grep -qx "$src" "$work/b.sources"; then
      echo "differs    $src ($v): only in one tree"; status=1
    elif grep -qx "$src ($v)" "$work/a.failed" 2>/dev/null; then
      echo "cannot tell $src ($v): it does not compile at $base"; [ $status = 1 ] || status=2
    elif grep -qx "$src ($v)" "$work/b.failed" 2>/dev/null; then
      cat "$work/b.$key.log"; echo "cannot tell $src ($v): it does not compile in the tree"; [ $status = 1 ] || status=2
    elif cmp -s "$work/a.$key.cubin" "$work/b.$key.cubin"; then
      echo "identical  $src ($v)"
    elif ptx_masked "$work/a.tree" "$src" "$v" "$work/a.ptx" && ptx_masked "$tree" "$src" "$v" "$work/b.ptx" &&
      cmp -s "$work/a.ptx" "$work/b.ptx"; then
      echo "same PTX   $src ($v): machine code differs in internal names only"
    else
      echo "differs    $src ($v)"; status=1
    fi
  done
done
exit $status
