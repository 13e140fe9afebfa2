#!/usr/bin/env python3
"""PyTorch's CPU side of docs/PERF.md: median ms of f32 forward for the standard CPU shapes,
at 1 and 2 threads. Run: python3 benches/torch_cpu.py [--json out.json]"""
import json
import sys
import time

import torch
import torch.nn.functional as F

CASES = [
    ("layer_norm_4096x1024", (4096, 1024), lambda x: F.layer_norm(x, (1024,), eps=1e-5)),
    ("batch_norm2d_train_32x64x56x56", (32, 64, 56, 56),
     lambda x: F.batch_norm(x, None, None, training=True, momentum=0.1, eps=1e-5)),
    ("group_norm32_8x256x64x64", (8, 256, 64, 64), lambda x: F.group_norm(x, 32, eps=1e-5)),
    ("instance_norm2d_8x64x64x64", (8, 64, 64, 64), lambda x: F.instance_norm(x, eps=1e-5)),
    ("rms_norm_4096x1024", (4096, 1024), lambda x: F.rms_norm(x, (1024,))),
]


def median_ms(f, x, reps=30):
    for _ in range(3):
        f(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "results": {}}
    with torch.no_grad():
        for name, shape, f in CASES:
            x = torch.randn(shape)
            row = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                row[f"{threads}t"] = median_ms(f, x)
            out["results"][name] = row
            print(f"{name:34s} 1t {row['1t']:8.3f} ms   2t {row['2t']:8.3f} ms", flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
