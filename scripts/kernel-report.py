#!/usr/bin/env python3
"""Runs ptxas -v on every PTX file of a folder (written by `cunorm kernels --ptx-dir`) and
writes a Markdown table of registers, spills, stack and shared memory per kernel; then, with
nvdisasm (next to ptxas: the PyPI wheel `nvidia-cuda-nvdisasm`), reads each kernel's SASS and
counts its global loads and stores by width, its calls of the 64-bit integer division
subroutines (`__cuda_sm20_div_*64`, `rem_*64`: a throughput cliff) and its float atomics.
Exits 1 if any kernel spills, calls a 64-bit division subroutine or has a float atomic (the
results would depend on the order the atomics land), or if a streaming kernel (one that reads
the tensors: every kernel but the small ones over statistics and partials, SMALL below) has no
16-byte global load, i.e. lost its vector path.

The counts are static (instructions in the code, not executions): a kernel with a 16-byte path
and a scalar fallback shows both.

usage: kernel-report.py PTXAS PTX_DIR ARCH OUT.md
"""
import re
import subprocess
import sys
from pathlib import Path

# Kernels over per-channel statistics, coefficients or partial sums (at most a few MiB), which
# need no 16-byte loads; every other kernel streams the tensors and must have a 16-byte path.
SMALL = re.compile(r"^(planes_(coef|eval_stats|finalize|grad_finalize|grad_params|running_update)"
                   r"|rows_col_sum)_")


def max_threads(regs):
    """Threads per block the register file allows (65 536 per block, per warp in units of 256);
    launches are capped at this (cuda/launch.rs block_threads)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    return min(1024, 65536 // per_warp * 32)


def sass_counts(ptxas, ptx, arch):
    """Per kernel of one PTX file: {kernel: {"ldg": {bytes: n}, "stg": {bytes: n}, "div64": n,
    "fatomic": n}} from its SASS (ptxas to a cubin, nvdisasm to text)."""
    nvdisasm = Path(ptxas).with_name("nvdisasm")
    if not nvdisasm.exists():
        sys.exit(f"kernel-report: {nvdisasm} missing; pip install nvidia-cuda-nvdisasm")
    cubin = Path("/tmp") / f"cunorm-report-{ptx.stem}.cubin"
    subprocess.run([ptxas, f"-arch={arch}", str(ptx), "-o", str(cubin)], check=True)
    sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    out, cur = {}, None
    width = {"8": 1, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\w+):", line)
        if m:
            cur = out.setdefault(m.group(1), {"ldg": {}, "stg": {}, "div64": 0, "fatomic": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", line)
        if m:
            mods = m.group(2).split(".")[1:]
            b = next((width[x] for x in mods if x in width), 4)
            d = cur["ldg" if m.group(1) == "LDG" else "stg"]
            d[b] = d.get(b, 0) + 1
        if re.search(r"CALL.*__cuda_sm\d+_(div|rem)_[su]64", line):
            cur["div64"] += 1
        if re.search(r"\b(RED|ATOM|ATOMG|ATOMS)\.[A-Z0-9.]*\b(ADD|MIN|MAX)\.(F32|F64|F16|BF16)", line) or \
                re.search(r"\b(RED|ATOM|ATOMG|ATOMS)[A-Z0-9.]*\.F(32|64|16)", line):
            cur["fatomic"] += 1
    return out


def widths(d):
    """`16 B ×41, 4 B ×12` from {bytes: count}, widest first."""
    return ", ".join(f"{b} B ×{n}" for b, n in sorted(d.items(), reverse=True)) or "–"


def main():
    ptxas, ptx_dir, arch, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    for ptx in sorted(ptx_dir.glob("*.ptx")):
        log = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx), "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
        name = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                name = m.group(1)
                cur = {"module": ptx.stem, "kernel": name}
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and name:
                cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                sm = re.search(r"(\d+) bytes smem", line)
                cur.update(regs=int(m.group(1)), smem=int(sm.group(1)) if sm else 0)
                rows.append(cur)
                name = None
    rows.sort(key=lambda r: (r["module"], r["kernel"]))
    for ptx in sorted(ptx_dir.glob("*.ptx")):
        counts = sass_counts(ptxas, ptx, arch)
        for r in rows:
            if r["module"] == ptx.stem:
                r.update(counts.get(r["kernel"], {"ldg": {}, "stg": {}, "div64": 0, "fatomic": 0}))
    spills = [r for r in rows if r.get("spill_st", 0) or r.get("spill_ld", 0)]
    divs = [r for r in rows if r["div64"]]
    atomics = [r for r in rows if r["fatomic"]]
    novec = [r for r in rows if not SMALL.match(r["kernel"]) and not r["ldg"].get(16)]
    lines = [
        "# Kernel resource report",
        "",
        f"Every kernel entry point compiled by NVRTC for `{arch}` (`cunorm kernels --arch {arch} --ptx-dir DIR`),",
        f"then `ptxas -arch={arch} -v` ({version}). Generated by `scripts/kernel-report.py` from `.ci/run`;",
        "Max threads: what the registers allow per block; launches are capped at it",
        "(`cuda/launch.rs` `block_threads`). Global loads/stores: SASS `LDG`/`STG` instructions by",
        "width, counted in the code (not executions; a 16-byte path and its scalar fallback both",
        "show). 64-bit div: calls of the `__cuda_sm20_{div,rem}_{s,u}64` subroutines. CI fails on a",
        "spill, a 64-bit division call, a float atomic, or a kernel that streams the tensors (all",
        "but the statistics/partials kernels: `SMALL` in the script) without a 16-byte load.",
        "",
        f"{len(rows)} kernels: {len(spills)} with spills, {len(divs)} calling 64-bit division, "
        f"{len(atomics)} with float atomics.",
        "",
        "| module | kernel | registers | max threads | spill st/ld (B) | stack (B) | static smem (B) | global loads | global stores | 64-bit div | float atomics |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['module']} | `{r['kernel']}` | {r['regs']} | {max_threads(r['regs'])} | "
                     f"{r['spill_st']}/{r['spill_ld']} | {r['stack']} | {r['smem']} | {widths(r['ldg'])} | "
                     f"{widths(r['stg'])} | {r['div64']} | {r['fatomic']} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} kernels, {len(spills)} with spills, {len(divs)} calling 64-bit division, "
          f"{len(atomics)} with float atomics -> {out}")
    for r in spills:
        print(f"SPILL: {r['kernel']}: {r['spill_st']} B stores, {r['spill_ld']} B loads")
    for r in divs:
        print(f"DIV64: {r['kernel']}: {r['div64']} calls of a 64-bit division subroutine")
    for r in atomics:
        print(f"FLOAT ATOMIC: {r['kernel']}: {r['fatomic']}")
    for r in novec:
        print(f"NO 16-BYTE LOAD: {r['kernel']} streams the tensors without a vector path")
    if spills or divs or atomics or novec:
        sys.exit(1)


if __name__ == "__main__":
    main()
