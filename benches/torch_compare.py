#!/usr/bin/env python3
"""PyTorch's side of `cunorm bench --compare`: the same cases (op x dtype x memory format x stage
over the standard shapes), timed the same way on the same GPU: torch.nn.functional ops, CUDA
events, 3 warm-up runs, median of 20 timed runs, L2 flushed before each timed run. Weight and
bias are in the input's dtype, as PyTorch's CUDA LayerNorm/GroupNorm read gamma, except
BatchNorm's, which stay f32 beside its running statistics (mixed precision's layout). OUT.json
is rewritten after every case, so a run cut short keeps what it measured.

usage: python3 benches/torch_compare.py OUT.json [--quick] [--reps N]
Keys match cunorm's BenchRow::key(): op|dtype|format|[shape]|stage.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

CASES = [(op, s) for s in [(65536, 128), (16384, 1024), (4096, 4096), (8192, 8192), (1024, 65536)]
         for op in ("layer_norm", "rms_norm")]
CASES += [("group_norm", (32, 512, 64, 64)), ("group_norm", (8, 256, 128, 128)),
          ("batch_norm", (64, 256, 56, 56)), ("batch_norm", (256, 64, 112, 112)),
          ("instance_norm", (16, 64, 256, 256)), ("instance_norm", (64, 256, 32, 32))]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def main():
    out = sys.argv[1]
    quick = "--quick" in sys.argv
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 20
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    flush = torch.empty(4 * max(l2, 1 << 20), dtype=torch.uint8, device=dev)

    def median(f):
        for _ in range(3):
            f()
        ts = []
        for _ in range(reps):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        ts.sort()
        return ts[len(ts) // 2]

    results = []
    seen = set()
    for op, shape in CASES:
        if quick and op in seen:
            continue
        seen.add(op)
        fmts = ["nchw"] if op in ("layer_norm", "rms_norm") else ["nchw", "nhwc"]
        for fmt in fmts:
            for dname, dt in DTYPES.items():
                x = torch.randn(shape, device=dev, dtype=dt)
                dy = torch.randn(shape, device=dev, dtype=dt)
                if fmt == "nhwc":
                    x = x.contiguous(memory_format=torch.channels_last)
                    dy = dy.contiguous(memory_format=torch.channels_last)
                c, last = shape[1], shape[-1]
                pc = last if op in ("layer_norm", "rms_norm") else c
                # BatchNorm keeps f32 parameters beside its f32 running statistics, as mixed
                # precision runs it (PyTorch's CUDA backward refuses f16 weights with f32 stats).
                pdt = torch.float32 if op == "batch_norm" else dt
                w = torch.ones(pc, device=dev, dtype=pdt, requires_grad=True)
                b = torch.zeros(pc, device=dev, dtype=pdt, requires_grad=True)
                rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
                if op == "layer_norm":
                    fwd = lambda x: F.layer_norm(x, (last,), w, b, 1e-5)
                elif op == "rms_norm":
                    fwd = lambda x: F.rms_norm(x, (last,), w)
                elif op == "group_norm":
                    fwd = lambda x: F.group_norm(x, 32, w, b, 1e-5)
                elif op == "batch_norm":
                    fwd = lambda x: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
                    ev = lambda x: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
                else:
                    fwd = lambda x: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5)
                    ev = lambda x: F.instance_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
                key = lambda stage: f"{op}|{dname}|{fmt}|{list(shape)}|{stage}"
                xg = x.detach().requires_grad_(True)
                params = (xg, w, b) if op != "rms_norm" else (xg, w)
                stages = [("forward", lambda: fwd(x))]
                if op in ("batch_norm", "instance_norm"):
                    stages.append(("eval", lambda: ev(x)))
                stages.append(("backward", None))
                for stage, f in stages:
                    try:
                        if f is None:
                            y = fwd(xg)
                            ms = median(lambda: torch.autograd.grad(y, params, dy, retain_graph=True))
                        else:
                            with torch.no_grad():
                                ms = median(f)
                    except RuntimeError as e:  # e.g. a dtype PyTorch does not support for this op
                        print(f"skip {key(stage)}: {e}", file=sys.stderr, flush=True)
                        continue
                    results.append({"key": key(stage), "ms": ms})
                    print(key(stage), f"{ms:.4f} ms", flush=True)
                    save(out, results)
                del x, dy, xg
                torch.cuda.empty_cache()
    save(out, results)


def save(out, results):
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                   "results": results}, fh, indent=1)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
