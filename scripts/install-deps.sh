#!/usr/bin/env bash
# Installs what the build needs and a fresh machine of this project's kind lacks (Debian/Ubuntu).
# Machines that already have everything (or have no package manager, like the GPU machine) are
# left alone.
set -euo pipefail

need=()
have_header() { [ -e "/usr/include/$1" ] || [ -e "/usr/local/include/$1" ]; }
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
have_header nlohmann/json.hpp || need+=(nlohmann-json3-dev)
have_header CLI/CLI.hpp || need+=(libcli11-dev)
have_header gtest/gtest.h || need+=(libgtest-dev)
have_header benchmark/benchmark.h || need+=(libbenchmark-dev)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-deps: missing ${need[*]} and no apt-get to install them" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
