#!/usr/bin/env python3
"""Turns kernels/*.cu into host C++ for the emulation (shim.h): one source with the inline PTX
conversions replaced, every 16-byte Pack cast routed through emu_pack_ptr (alignment check),
and a registry of the extern "C" entry points (name -> function) for the fake driver.

usage: prep.py KERNELS_DIR OUT_SOURCE OUT_REGISTRY
"""
import pathlib
import re
import sys

kdir, out_src, out_reg = map(pathlib.Path, sys.argv[1:4])
src = (kdir / "common.cuh").read_text()
for f in ["rows.cu", "planes.cu", "util.cu"]:
    src += "\n" + (kdir / f).read_text().replace('#include "common.cuh"', "")
src = src.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));', "f = emu_h2f(v.bits);")
src = src.replace('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));', "r.bits = emu_f2h(v);")
src = src.replace('asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));',
                  "r = (unsigned)emu_f2h(lo) | ((unsigned)emu_f2h(hi) << 16);")
# Every dynamic shared memory declaration (rows.cu's row cache, planes.cu's tile) points at the
# emulated block's buffer.
src, dyns = re.subn(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
                    r"unsigned char* \1 = emu_dyn_smem;", src)
assert dyns >= 2, f"expected the dynamic shared memory of rows.cu and planes.cu, found {dyns}"
assert "extern __shared__" not in src, "a dynamic shared memory declaration prep.py does not know"
# The cluster primitives (inline PTX) become the emulator's (shim.h).
src, prims = re.subn(r"// cluster-primitives-begin.*?// cluster-primitives-end", """
__device__ __forceinline__ unsigned cluster_rank() { return emu_cluster_rank(); }
__device__ __forceinline__ unsigned cluster_blocks() { return emu_cluster_blocks(); }
__device__ __forceinline__ void cluster_sync() { emu_cluster_sync(); }
__device__ __forceinline__ float cluster_load(const float* p, unsigned rank) { return emu_cluster_load(p, rank); }
""", src, flags=re.S)
assert prims == 1, "common.cuh's cluster primitives block not found: update prep.py"
src, packs = re.subn(r"reinterpret_cast<((?:const )?Pack<\w+>)\*>\(", r"emu_pack_ptr<\1>(", src)
assert packs >= 5, f"expected the Pack casts of rows.cu and planes.cu, found {packs}"
assert not re.search(r"\basm\b", src), "unhandled inline asm"
# A cluster kernel keeps all its shared memory dynamic: the emulator runs a cluster's blocks
# together and has one copy of each static __shared__ array (shim.h), which they would share.
for fn in ["rows_fwd_cluster", "rows_bwd_cluster"]:
    body = re.search(r"void " + fn + r"\(.*?\n}\n", src, re.S)
    assert body, f"{fn} not found: update prep.py"
    assert not re.search(r"(?<!extern )__shared__", body.group(0)), f"static __shared__ in {fn}"
# NVRTC 13.0 (the GPU machines' toolkit, 2026-11-27) takes a generic lambda's call operator for a
# host function and refuses the module; the wheels' NVRTC 13.5 accepts it, so the NVRTC test here
# would not catch one.
assert not re.search(r"\]\s*\(\s*auto\b", src), "generic lambda in a kernel: NVRTC 13.0 refuses it"
out_src.write_text(src)

# Entry points: plain ones, and the per-dtype ones of CUNORM_FOR_DTYPES macros.
# (A cluster kernel's CUNORM_CLUSTER_DIMS(KM) comes first; its name may follow on the next line
# of a macro.)
KERNEL = r'extern "C" __global__ void (?:CUNORM_CLUSTER_DIMS\(\w+\)\s+)?(?:__launch_bounds__\([^()]+\)[\s\\]+)?'
names = re.findall(KERNEL + r"(?!__launch_bounds__|CUNORM_CLUSTER_DIMS)(\w+)\(", src)
# The definition with every dtype (common.cuh also has one-dtype ones, for per-dtype modules).
dtypes = max(re.findall(r"#define CUNORM_FOR_DTYPES\(M\)(.*)", src), key=len)
suffixes = re.findall(r"M\(\w+, (\w+)\)", dtypes)
for macro_body in re.findall(KERNEL + r"(\w+)##NAME\(", src):
    names += [macro_body + s for s in suffixes]
# Macros instantiated per template constant KM (ROWS_REG_FWD/BWD): NAME##KM##_##NAME entry
# points, from the per-dtype list macro (every dtype) and from top-level calls (one dtype).
def macro_body(name):
    m = re.search(r"#define " + name + r"\(T, NAME, KM\)((?:.*\\\n)*.*)", src)
    assert m, f"macro {name} not found: update prep.py"
    return m.group(1)
# A macro may instead call a (T, NAME, KIND, KM) one with a kind (ROWS_BWD_K: reg or team),
# whose entry points are PREFIX##KIND##KM##_##NAME.
def kernels_of(macro):
    body = macro_body(macro)
    found = re.findall(KERNEL + r"(\w+)##KM##_##NAME\(", body)
    for inner, kind in re.findall(r"(\w+)\(T, NAME, (\w+), KM\)", body):
        m = re.search(r"#define " + inner + r"\(T, NAME, KIND, KM\)((?:.*\\\n)*.*)", src)
        assert m, f"macro {inner} not found: update prep.py"
        found += [k + kind for k in re.findall(KERNEL + r"(\w+)##KIND##KM##_##NAME\(", m.group(1))]
    assert found, f"no entry points in {macro}: update prep.py"
    return found
# Blocks per cluster of each entry point (1 but for the cluster kernels: CUNORM_CLUSTER_DIMS(KM)).
cluster = {}
CLUSTER_MACROS = ["ROWS_CLUSTER_FWD", "ROWS_CLUSTER_BWD"]
for macro in ["ROWS_REG_FWD", "ROWS_REG_BWD", "ROWS_TEAM_FWD", "ROWS_TEAM_BWD"] + CLUSTER_MACROS:
    kernels = kernels_of(macro)
    clustered = "CUNORM_CLUSTER_DIMS(KM)" in macro_body(macro)
    per_dtype = re.findall(macro + r"\(T, NAME, (\d+)\)", src)
    one = re.findall(r"^" + macro + r"\(\w+, (\w+), (\d+)\)", src, re.M)
    for k in kernels:
        for n, km in [(f"{k}{km}_{s}", km) for km in per_dtype for s in suffixes] + [(f"{k}{km}_{s}", km) for s, km in one]:
            names.append(n)
            if clustered:
                cluster[n] = int(km)
assert len(names) == len(set(names)), "duplicate entry point"
# Every cluster kernel is one of the macros above (else the fake driver would run it unclustered).
assert src.count("CUNORM_CLUSTER_DIMS(KM)") == sum(macro_body(m).count("CUNORM_CLUSTER_DIMS(KM)") for m in CLUSTER_MACROS), \
    "a cluster kernel outside CLUSTER_MACROS: update prep.py"
assert cluster, "no cluster kernels found"
lines = [f'    {{"{n}", emu_entry(&{n}, {cluster.get(n, 1)})}},' for n in sorted(names)]
out_reg.write_text("// generated by prep.py\n" + "\n".join(lines) + "\n")
print(f"prep.py: {len(names)} entry points ({len(cluster)} cluster kernels), {packs} vector casts checked")
