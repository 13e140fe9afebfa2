#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels (see shim.h, emu.cpp). Needs g++ ≥ 12.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/target/kernel-emu}
mkdir -p "$build"
python3 - "$root/kernels" "$build/kernels_emu.inc" <<'PY'
import re, sys, pathlib
k = pathlib.Path(sys.argv[1])
src = (k / "common.cuh").read_text()
for f in ["rows.cu", "planes.cu"]:
    src += "\n" + (k / f).read_text().replace('#include "common.cuh"', "")
src = src.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));', "f = emu_h2f(v.bits);")
src = src.replace('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));', "r.bits = emu_f2h(v);")
src = src.replace("extern __shared__ float row_cache[];", "float* row_cache = emu_dyn_smem;")
assert "asm(" not in src, "unhandled inline asm"
pathlib.Path(sys.argv[2]).write_text(src)
PY
g++ -std=c++20 -O2 -pthread -I "$build" -I "$here" "$here/emu.cpp" -o "$build/emu"
"$build/emu"
