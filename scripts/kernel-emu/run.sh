#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels (see shim.h, emu.cpp). Needs g++ ≥ 12
# on x86-64.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/target/kernel-emu}
mkdir -p "$build"
python3 "$here/prep.py" "$root/kernels" "$build/kernels_emu.inc" "$build/kernels_registry.inc"
g++ -std=c++20 -O2 -I "$build" -I "$here" "$here/emu.cpp" -o "$build/emu"
"$build/emu"
