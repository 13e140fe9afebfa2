#!/usr/bin/env python3
"""cunorm's CPU path against PyTorch's CPU, side by side, on one machine, in one run.

Every op x {f32, bf16, f16} x {NCHW, NHWC (the planes ops)} x {forward, backward} x {1, 2
threads} on the standard CPU shapes plus small in-cache ones (benches/cpu_cases.json, which
`cargo bench --bench cpu` also reads). Both sides are timed the same
way: inputs, dy and the saved forward state made before the timing, the op's outputs allocated
inside it, two warm-up calls, then the median of --reps calls. PyTorch is timed twice, with its
default allocator and with transparent huge pages (THP_MEM_ALLOC_ENABLE=1, which cunorm's
allocator asks for on large outputs). The three sides run in turn, round after round
(--rounds), each in its own process; the figure of a case is the median over rounds.

  python3 benches/cpu_compare.py                 # the whole table (~10 min on 2 cores)
  python3 benches/cpu_compare.py --quick         # one round, 3 reps, for a first look
  python3 benches/cpu_compare.py --only 'group_norm.*(bf16|f16)' --markdown docs/cpu_table.md --json out.json

Ratio = PyTorch time / cunorm time (> 1: cunorm faster). Needs `cargo build --release` first
(or --bin) and PyTorch in this python (or --python). Backward on the PyTorch side is
torch.autograd.grad of the op's output with respect to x, weight and bias on a graph built
before the timing (the same kernels a training step runs).
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

# The cases, shared with `cunorm cpu-bench` and `cargo bench --bench cpu`.
CASES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_cases.json")


def cases():
    return json.load(open(CASES_FILE))


# ------------------------------------------------------------------------------------------
# PyTorch's side (run in a child process so that THP_MEM_ALLOC_ENABLE takes effect)
# ------------------------------------------------------------------------------------------

def torch_side(case_file, threads, reps):
    import time

    import torch
    import torch.nn.functional as F

    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    results = {}
    for c in json.load(open(case_file)):
        dt = dtypes[c["dtype"]]
        shape = c["shape"]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen).to(dt)
        dy = torch.randn(shape, generator=gen).to(dt)
        if c["format"] == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        op = c["op"]
        n = shape[-1] if op in ("layer_norm", "rms_norm") else shape[1]
        w = torch.ones(n, dtype=dt)
        b = torch.zeros(n, dtype=dt)
        eps = 1e-5
        if op == "layer_norm":
            def f(x, w, b): return F.layer_norm(x, (n,), w, b, eps)
        elif op == "rms_norm":
            def f(x, w, b): return F.rms_norm(x, (n,), w, eps)
        elif op == "group_norm":
            def f(x, w, b): return F.group_norm(x, c["groups"], w, b, eps)
        elif op == "batch_norm":
            def f(x, w, b): return F.batch_norm(x, None, None, w, b, True, 0.1, eps)
        else:
            def f(x, w, b): return F.instance_norm(x, None, None, w, b, True, 0.1, eps)
        if c["stage"] == "forward":
            def call():
                with torch.no_grad():
                    f(x, w, b)
        else:
            xg = x.detach().requires_grad_()
            wg = w.detach().requires_grad_()
            bg = b.detach().requires_grad_()
            inputs = [xg, wg] if op == "rms_norm" else [xg, wg, bg]
            y = f(xg, wg, bg)

            def call():
                torch.autograd.grad(y, inputs, dy, retain_graph=True)
        row = {}
        for t in threads:
            torch.set_num_threads(t)
            for _ in range(2):
                call()
            times = []
            for _ in range(reps):
                s = time.perf_counter()
                call()
                times.append((time.perf_counter() - s) * 1e3)
            row[str(t)] = statistics.median(times)
        results[c["key"]] = row
    print(json.dumps(results))


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------

def run_side(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="one round of 3 reps")
    ap.add_argument("--only", default="", help="keep the cases whose key matches this regex")
    ap.add_argument("--bin", default="target/release/cunorm")
    ap.add_argument("--python", default=sys.executable, help="the python that has PyTorch")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--torch-side", nargs=3, metavar=("CASES", "THREADS", "REPS"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_side:
        f, t, r = a.torch_side
        torch_side(f, [int(v) for v in t.split(",")], int(r))
        return
    if a.quick:
        a.rounds, a.reps = 1, 3
    threads = [int(v) for v in a.threads.split(",")]
    todo = [c for c in cases() if re.search(a.only, c["key"])]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(todo, fh)
        case_file = fh.name
    me = os.path.abspath(__file__)
    sides = {
        "cunorm": None,  # one process per thread count: rayon's global pool is sized once
        "torch": ([a.python, me, "--torch-side", case_file, a.threads, str(a.reps)],
                  {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}),
        "torch_thp": ([a.python, me, "--torch-side", case_file, a.threads, str(a.reps)],
                      {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}),
    }
    runs = {s: [] for s in sides}
    for r in range(a.rounds):
        for name, side in sides.items():
            print(f"round {r + 1}/{a.rounds}: {name} ({len(todo)} cases)", file=sys.stderr,
                  flush=True)
            if side is None:
                merged = {}
                for t in threads:
                    part = run_side([a.bin, "cpu-bench", "--cases", case_file, "--threads",
                                     str(t), "--reps", str(a.reps)])
                    for k, v in part.items():
                        merged.setdefault(k, {}).update(v)
                runs[name].append(merged)
            else:
                runs[name].append(run_side(*side))
    os.unlink(case_file)
    med = {s: {c["key"]: {str(t): statistics.median(run[c["key"]][str(t)] for run in runs[s])
                          for t in threads} for c in todo} for s in sides}
    torch_version = subprocess.run(
        [a.python, "-c", "import torch; print(torch.__version__, "
         "torch.backends.cpu.get_cpu_capability())"],
        capture_output=True, text=True).stdout.strip()
    head = (f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; PyTorch {torch_version}; "
            f"{a.rounds} rounds x {a.reps} reps, medians; ratio = PyTorch ms / cunorm ms; "
            f"THP = PyTorch with THP_MEM_ALLOC_ENABLE=1; own-f32 = this dtype's cunorm time / "
            f"cunorm's f32 time")
    lines = [head, ""]
    cols = ["case"]
    for t in threads:
        cols += [f"cunorm {t}t ms", f"torch {t}t ms", f"ratio {t}t", f"THP ratio {t}t"]
    cols += ["own-f32 1t"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for c in todo:
        k = c["key"]
        row = [k.replace("|", " ")]
        for t in map(str, threads):
            cu, th, tp = med["cunorm"][k][t], med["torch"][k][t], med["torch_thp"][k][t]
            row += [f"{cu:.3f}", f"{th:.3f}", f"{th / cu:.2f}", f"{tp / cu:.2f}"]
        f32key = k.replace(f"|{c['dtype']}|", "|f32|")
        t1 = str(threads[0])
        if c["dtype"] != "f32" and f32key in med["cunorm"]:
            row.append(f"{med['cunorm'][k][t1] / med['cunorm'][f32key][t1]:.2f}")
        else:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.markdown:
        open(a.markdown, "w").write(table)
    if a.json:
        json.dump({"head": head, "median": med, "runs": runs}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
