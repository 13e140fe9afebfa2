#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels (see shim.h, emu.cpp). Needs g++ ≥ 12
# on x86-64.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/target/kernel-emu}
mkdir -p "$build"
python3 "$here/prep.py" "$root/kernels" "$build/kernels_emu.inc" "$build/kernels_registry.inc"
# RUN_VALUES=8: planes.cu's statistics fold a run every 8 values a channel (128 on the GPU), so
# that the small shapes here merge several runs a thread, each spanning two loop iterations (4 rows each).
g++ -std=c++20 -O2 -DRUN_VALUES=8 -I "$build" -I "$here" "$here/emu.cpp" -o "$build/emu"
"$build/emu"
