#!/usr/bin/env bash
# Counts the DRAM traffic of cunorm's kernels on the fake CUDA driver: builds its traffic variant
# (the kernels instrumented with GCC's -fsanitize=thread hooks, counted by traffic.cpp; no
# ThreadSanitizer runtime) and runs `cunorm bench --traffic` over the standard cases with the
# arguments given (e.g. `--quick`, `--ops layer_norm`, `--traffic-cap N`, `--json-out F`).
# A model of the traffic (every access to a buffer > 1 MiB counted, no cache reuse), not a GPU
# measurement; see docs/PERF.md.
#
# usage: scripts/fake-cuda/traffic.sh [BUILD_DIR] [cunorm bench arguments...]
# needs: g++ >= 12 on x86-64, libnvrtc (CUNORM_NVRTC_DIR or the usual places).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=$root/target/fake-cuda
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  dir=$1
  shift
fi
build=$(mkdir -p "$dir" && cd "$dir" && pwd)

python3 "$here/../kernel-emu/prep.py" "$root/kernels" "$build/kernels_emu.inc" "$build/kernels_registry.inc" > /dev/null
mkdir -p "$build/traffic"
g++ -std=c++20 -g -fPIC -fvisibility=hidden -I "$build" -I "$here/../kernel-emu" -I "$here" -O2 \
  -DEMU_TRAFFIC -fsanitize=thread -c "$here/fakecuda.cpp" -o "$build/traffic/fakecuda.o"
g++ -std=c++20 -fPIC -fvisibility=hidden -O2 -c "$here/traffic.cpp" -o "$build/traffic/traffic.o"
g++ -shared "$build/traffic/fakecuda.o" "$build/traffic/traffic.o" -Wl,-z,defs \
  -o "$build/traffic/libcuda.so.1"
ln -sf libcuda.so.1 "$build/traffic/libcuda.so"
(cd "$root" && cargo build --release --quiet)
# Run from the caller's directory, so that a relative --json-out lands there. 132 SMs, as an
# H100's: launch grids that follow the SM count (the row forwards) split the work as there.
FAKECUDA_SMS=${FAKECUDA_SMS:-132} CUNORM_CACHE_DIR="$build/kernel-cache" LD_LIBRARY_PATH="$build/traffic${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "${CARGO_TARGET_DIR:-$root/target}/release/cunorm" bench --traffic "$@"
