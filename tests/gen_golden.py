#!/usr/bin/env python3
"""Generates cunorm's PyTorch golden cases: tests/data/golden.json (index) + golden.bin (f32 LE).

Run: python3 -m venv .venv && .venv/bin/pip install torch numpy && .venv/bin/python tests/gen_golden.py

Every reference is computed by PyTorch's own modules in float64 from inputs already rounded to the
case's dtype, with f64 parameters; outputs and dx are then rounded once to that dtype, which is
cunorm's contract ("statistics in f32 or wider, output rounded once"). Parameters, running
statistics and dweight/dbias are stored as f32. Each case runs a few training steps (forward +
backward), then an evaluation step (forward + backward). The "nonfinite" cases put NaN and ±inf
into some normalized sets (see `run_nonfinite`) and also keep the statistics PyTorch saves. Layouts: the Rust test runs every 3-D to
5-D case both contiguous and channels-last against the same reference.
"""
import json
import os
import struct

import torch
import torch.nn as nn

torch.manual_seed(1234)
HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
F32_EPS = float(torch.finfo(torch.float32).eps)

blob = bytearray()


def put(t):
    """Appends a tensor (as f32) to the blob; returns [offset, length] in elements."""
    v = t.detach().reshape(-1).to(torch.float32).tolist()
    off = len(blob) // 4
    blob.extend(struct.pack("<%df" % len(v), *v))
    return [off, len(v)]


def make(layer, dim, cfg):
    if layer == "batch_norm":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        return cls(cfg["num_features"], eps=cfg["eps"], momentum=cfg["momentum"],
                   affine=cfg["affine"], track_running_stats=cfg["track_running_stats"])
    if layer == "instance_norm":
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
        return cls(cfg["num_features"], eps=cfg["eps"], momentum=cfg["momentum"],
                   affine=cfg["affine"], track_running_stats=cfg["track_running_stats"])
    if layer == "layer_norm":
        return nn.LayerNorm(cfg["normalized_shape"], eps=cfg["eps"],
                            elementwise_affine=cfg["elementwise_affine"], bias=cfg["bias"])
    if layer == "group_norm":
        return nn.GroupNorm(cfg["num_groups"], cfg["num_channels"], eps=cfg["eps"], affine=cfg["affine"])
    if layer == "rms_norm":
        eps = cfg["eps"] if cfg["eps"] is not None else F32_EPS
        return nn.RMSNorm(cfg["normalized_shape"], eps=eps, elementwise_affine=cfg["elementwise_affine"])
    raise ValueError(layer)


def defaults(layer, **kw):
    base = {
        "batch_norm": dict(eps=1e-5, momentum=0.1, affine=True, track_running_stats=True),
        "instance_norm": dict(eps=1e-5, momentum=0.1, affine=False, track_running_stats=False),
        "layer_norm": dict(eps=1e-5, elementwise_affine=True, bias=True),
        "group_norm": dict(eps=1e-5, affine=True),
        "rms_norm": dict(eps=None, elementwise_affine=True),
    }[layer].copy()
    base.update(kw)
    return base


def init_params(m, case):
    """Random weight (1 + 0.5·N(0, 1)) and bias (0.5·N(0, 1)), f32 values in the module's own
    dtype, stored in the case."""
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.copy_((1.0 + 0.5 * torch.randn(m.weight.shape)).float())
            case["weight"] = put(m.weight)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_((0.5 * torch.randn(m.bias.shape)).float())
            case["bias"] = put(m.bias)


def run_case(name, layer, dim, cfg, shape, dtype, train_steps=2, eval_steps=1, mean=0.0, std=1.0):
    dt = DTYPES[dtype]
    m = make(layer, dim, cfg).double()
    case = {"name": f"{name}/{dtype}", "layer": layer, "dim": dim, "dtype": dtype, "config": cfg,
            "shape": list(shape), "mean": mean, "std": std, "steps": []}
    init_params(m, case)
    for step in range(train_steps + eval_steps):
        training = step < train_steps
        m.train(training)
        x = (mean + std * torch.randn(shape)).to(dt).double().requires_grad_(True)
        dy = torch.randn(shape).to(dt).double()
        for p in m.parameters():
            p.grad = None
        y = m(x)
        y.backward(dy)
        s = {"train": training, "x": put(x), "dy": put(dy), "y": put(y.to(dt)), "dx": put(x.grad.to(dt))}
        if getattr(m, "weight", None) is not None:
            s["dweight"] = put(m.weight.grad)
        if getattr(m, "bias", None) is not None:
            s["dbias"] = put(m.bias.grad)
        case["steps"].append(s)
    if getattr(m, "running_mean", None) is not None:
        case["running_mean"] = put(m.running_mean)
        case["running_var"] = put(m.running_var)
        case["num_batches_tracked"] = int(m.num_batches_tracked)
    return case


def cases():
    bn, inn, ln, gn, rms = "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"
    out = [
        # BatchNorm
        ("bn1d_2d_input", bn, 1, defaults(bn, num_features=5), (7, 5), {}),
        ("bn1d_3d_input", bn, 1, defaults(bn, num_features=3), (4, 3, 11), {}),
        ("bn2d_default", bn, 2, defaults(bn, num_features=3), (2, 3, 5, 7), {}),
        ("bn2d_momentum_none", bn, 2, defaults(bn, num_features=4, momentum=None), (3, 4, 3, 5), {"train_steps": 3}),
        ("bn2d_affine_false", bn, 2, defaults(bn, num_features=3, affine=False), (2, 3, 4, 4), {}),
        ("bn2d_no_running_stats", bn, 2, defaults(bn, num_features=3, track_running_stats=False), (2, 3, 3, 3), {}),
        ("bn2d_eps_momentum", bn, 2, defaults(bn, num_features=2, eps=1e-3, momentum=0.3), (5, 2, 3, 2), {}),
        ("bn2d_n1", bn, 2, defaults(bn, num_features=4), (1, 4, 3, 3), {}),
        ("bn2d_prime", bn, 2, defaults(bn, num_features=7), (3, 7, 13, 1), {}),
        ("bn2d_mean1e4", bn, 2, defaults(bn, num_features=3), (4, 3, 5, 5), {"mean": 1e4}),
        ("bn3d_default", bn, 3, defaults(bn, num_features=3), (2, 3, 3, 4, 5), {}),
        # InstanceNorm
        ("in1d_default", inn, 1, defaults(inn, num_features=3), (2, 3, 17), {}),
        ("in1d_unbatched", inn, 1, defaults(inn, num_features=3, affine=True), (3, 17), {}),
        ("in2d_default", inn, 2, defaults(inn, num_features=3), (2, 3, 5, 6), {}),
        ("in2d_affine_track", inn, 2, defaults(inn, num_features=4, affine=True, track_running_stats=True, momentum=0.2), (3, 4, 5, 3), {"train_steps": 3}),
        ("in2d_track_momentum_none", inn, 2, defaults(inn, num_features=2, track_running_stats=True, momentum=None), (2, 2, 4, 4), {}),
        ("in2d_n1_eps", inn, 2, defaults(inn, num_features=5, eps=1e-2, affine=True), (1, 5, 3, 7), {}),
        ("in2d_mean1e4", inn, 2, defaults(inn, num_features=3, affine=True, track_running_stats=True), (2, 3, 6, 6), {"mean": 1e4}),
        ("in3d_default", inn, 3, defaults(inn, num_features=2, affine=True), (2, 2, 3, 4, 5), {}),
        # LayerNorm
        ("ln_1d", ln, 0, defaults(ln, normalized_shape=[13]), (5, 13), {}),
        ("ln_2d_shape", ln, 0, defaults(ln, normalized_shape=[4, 5]), (2, 3, 4, 5), {}),
        ("ln_no_affine", ln, 0, defaults(ln, normalized_shape=[31], elementwise_affine=False), (3, 31), {}),
        ("ln_no_bias", ln, 0, defaults(ln, normalized_shape=[17], bias=False), (4, 17), {}),
        ("ln_eps", ln, 0, defaults(ln, normalized_shape=[8], eps=1e-2), (6, 8), {}),
        ("ln_n1_long", ln, 0, defaults(ln, normalized_shape=[257]), (1, 257), {}),
        ("ln_seed_shape", ln, 0, defaults(ln, normalized_shape=[4, 2, 2]), (2, 4, 2, 2), {}),
        ("ln_mean1e4", ln, 0, defaults(ln, normalized_shape=[129]), (6, 129), {"mean": 1e4}),
        # GroupNorm
        ("gn_seed", gn, 0, defaults(gn, num_groups=2, num_channels=4), (2, 4, 2, 2), {}),
        ("gn_3_6", gn, 0, defaults(gn, num_groups=3, num_channels=6), (3, 6, 5, 7), {}),
        ("gn_1group_3d", gn, 0, defaults(gn, num_groups=1, num_channels=5), (2, 5, 3), {}),
        ("gn_instance_like", gn, 0, defaults(gn, num_groups=5, num_channels=5), (2, 5, 4, 4), {}),
        ("gn_affine_false", gn, 0, defaults(gn, num_groups=2, num_channels=6, affine=False), (2, 6, 3, 3), {}),
        ("gn_2d_input", gn, 0, defaults(gn, num_groups=3, num_channels=6), (4, 6), {}),
        ("gn_5d", gn, 0, defaults(gn, num_groups=2, num_channels=4, eps=1e-3), (2, 4, 3, 3, 3), {}),
        ("gn_n1", gn, 0, defaults(gn, num_groups=2, num_channels=6), (1, 6, 3, 3), {}),
        ("gn_mean1e4", gn, 0, defaults(gn, num_groups=2, num_channels=4), (2, 4, 5, 5), {"mean": 1e4}),
        # RMSNorm
        ("rms_1d", rms, 0, defaults(rms, normalized_shape=[13]), (5, 13), {}),
        ("rms_2d_shape", rms, 0, defaults(rms, normalized_shape=[4, 6]), (2, 3, 4, 6), {}),
        ("rms_no_affine", rms, 0, defaults(rms, normalized_shape=[19], elementwise_affine=False), (3, 19), {}),
        ("rms_eps", rms, 0, defaults(rms, normalized_shape=[8], eps=1e-5), (6, 8), {}),
        ("rms_n1_long", rms, 0, defaults(rms, normalized_shape=[301]), (1, 301), {}),
        ("rms_mean1e4", rms, 0, defaults(rms, normalized_shape=[64]), (4, 64), {"mean": 1e4}),
    ]
    return out


def saved_stats(layer, m, x):
    """The statistics PyTorch's own forward saves for backward, from its native ops: mean and rstd
    per normalized set (RMSNorm: rstd only), flattened in cunorm's order."""
    with torch.no_grad():
        if layer == "batch_norm":
            _, mean, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        elif layer == "instance_norm":
            flat = x.reshape(1, x.shape[0] * x.shape[1], -1)
            _, mean, rstd = torch.native_batch_norm(flat, None, None, None, None, True, 0.0, m.eps)
        elif layer == "layer_norm":
            _, mean, rstd = torch.native_layer_norm(x, m.normalized_shape, None, None, m.eps)
        elif layer == "group_norm":
            n, c = x.shape[0], x.shape[1]
            _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), m.num_groups, m.eps)
        else:
            _, rstd = torch.ops.aten._fused_rms_norm(x, list(m.normalized_shape), None, m.eps)
            return {"rstd": put(rstd)}
    return {"mean": put(mean), "rstd": put(rstd)}


def run_nonfinite(name, layer, dim, cfg, shape, dtype, inject):
    """A case whose training input holds NaN/±inf at the flat indices of `inject`: PyTorch's own
    f32 modules on the input rounded to `dtype` (the propagation of a non-finite value is what is
    checked, and PyTorch's f16/bf16 CPU kernels accumulate in f32 the same way), then, for layers
    with running statistics, an evaluation step on a finite input."""
    dt = DTYPES[dtype]
    m = make(layer, dim, cfg)
    case = {"name": f"{name}/{dtype}", "layer": layer, "dim": dim, "dtype": dtype, "config": cfg,
            "shape": list(shape), "mean": 0.0, "std": 1.0, "steps": []}
    init_params(m, case)
    has_running = getattr(m, "running_mean", None) is not None
    for training in [True, False] if has_running else [True]:
        m.train(training)
        x = torch.randn(shape).to(dt).float()
        if training:
            flat = x.view(-1)
            for i, v in inject:
                flat[i] = v
        x.requires_grad_(True)
        dy = torch.randn(shape).to(dt).float()
        for p in m.parameters():
            p.grad = None
        y = m(x)
        y.backward(dy)
        s = {"train": training, "x": put(x), "dy": put(dy), "y": put(y.to(dt)), "dx": put(x.grad.to(dt))}
        if training:
            s.update(saved_stats(layer, m, x.detach()))
        if getattr(m, "weight", None) is not None:
            s["dweight"] = put(m.weight.grad)
        if getattr(m, "bias", None) is not None:
            s["dbias"] = put(m.bias.grad)
        case["steps"].append(s)
    if has_running:
        case["running_mean"] = put(m.running_mean)
        case["running_var"] = put(m.running_var)
        case["num_batches_tracked"] = int(m.num_batches_tracked)
    return case


def nonfinite_cases():
    """NaN and ±inf in one normalized set each, the other sets finite (issue: never a wrong answer)."""
    bn, inn, ln, gn, rms = "batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"
    nan, inf = float("nan"), float("inf")
    # [3, 4, 4, 4]: index of (n, c, h, w) = ((n·4 + c)·4 + h)·4 + w.
    at = lambda n, c, h, w: ((n * 4 + c) * 4 + h) * 4 + w
    # InstanceNorm sets (n, c): (1, 0) NaN, (0, 1) +inf, (2, 2) -inf, (0, 3) +inf and -inf.
    # GroupNorm sets (n, g), 2 groups: (1, 0) NaN, (0, 0) +inf, (2, 1) -inf, (0, 1) ±inf.
    planes4 = [(at(1, 0, 2, 2), nan), (at(0, 1, 1, 3), inf), (at(2, 2, 0, 0), -inf),
               (at(0, 3, 3, 1), inf), (at(0, 3, 2, 0), -inf)]
    return [
        # channel 0 NaN, 1 +inf, 2 -inf, 3 +inf and -inf; channel 4 finite.
        ("bn2d_nonfinite", bn, 2, defaults(bn, num_features=5), (3, 5, 4, 4),
         [(((n * 5 + c) * 4 + h) * 4 + w, v) for (n, c, h, w, v) in
          [(1, 0, 2, 2, nan), (0, 1, 1, 3, inf), (2, 2, 0, 0, -inf), (0, 3, 3, 1, inf), (1, 3, 2, 0, -inf)]]),
        # One sample: a NaN among 4 values of channel 0 (the BatchNorm1d [1, 2, 4]).
        ("bn1d_n1_nan", bn, 1, defaults(bn, num_features=2), (1, 2, 4), [(2, nan)]),
        ("bn1d_2d_inf", bn, 1, defaults(bn, num_features=3), (6, 3), [(4, inf), (8, nan)]),
        ("in2d_nonfinite", inn, 2, defaults(inn, num_features=4, affine=True, track_running_stats=True),
         (3, 4, 4, 4), planes4),
        ("in1d_nonfinite", inn, 1, defaults(inn, num_features=2, affine=True), (2, 2, 6), [(3, inf), (20, nan)]),
        # rows: 0 NaN, 1 +inf, 2 -inf, 3 ±inf, 4 finite; and rows of one value. PyTorch's CPU
        # LayerNorm gives a NaN mean for a row holding an infinity, except when the infinity is
        # the last lane of the last full vector of the row (index 7 of 15 with AVX2, 15 of 16,
        # 63 of 64): its cascade then keeps ±inf. That depends on the CPU's vector width, so the
        # cases keep clear of it, and cunorm gives NaN everywhere (as PyTorch's CUDA Welford).
        ("ln_nonfinite", ln, 0, defaults(ln, normalized_shape=[16]), (5, 16),
         [(5, nan), (16 + 9, inf), (32, -inf), (48 + 2, inf), (48 + 15, -inf)]),
        ("ln_nonfinite_2d_shape", ln, 0, defaults(ln, normalized_shape=[3, 5]), (4, 3, 5),
         [(0, inf), (15 + 14, nan), (30 + 4, -inf)]),
        ("ln_single_value", ln, 0, defaults(ln, normalized_shape=[1]), (4, 1), [(0, inf), (1, nan), (2, -inf)]),
        ("gn_nonfinite", gn, 0, defaults(gn, num_groups=2, num_channels=4), (3, 4, 4, 4), planes4),
        ("gn_nonfinite_3d", gn, 0, defaults(gn, num_groups=3, num_channels=6), (2, 6, 5),
         [(3, inf), (12, nan), (30 + 21, -inf)]),
        ("rms_nonfinite", rms, 0, defaults(rms, normalized_shape=[16]), (5, 16),
         [(5, nan), (16 + 9, inf), (32, -inf), (48 + 2, inf), (48 + 15, -inf)]),
    ]


def main():
    index = []
    for name, layer, dim, cfg, shape, kw in cases():
        for dtype in DTYPES:
            if kw.get("mean", 0.0) != 0.0 and dtype != "f32":
                # f16/bf16 cannot hold 1e4 + N(0, 1) (ulp 8 / 64): the case only makes sense in f32.
                continue
            index.append(run_case(name, layer, dim, cfg, shape, dtype, **kw))
    nonfinite = []
    for name, layer, dim, cfg, shape, inject in nonfinite_cases():
        for dtype in DTYPES:
            nonfinite.append(run_nonfinite(name, layer, dim, cfg, shape, dtype, inject))
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    with open(os.path.join(HERE, "data", "golden.bin"), "wb") as f:
        f.write(blob)
    with open(os.path.join(HERE, "data", "golden.json"), "w") as f:
        json.dump({"torch": torch.__version__, "cases": index, "nonfinite": nonfinite}, f, indent=0)
    print(f"{len(index)} cases, {len(nonfinite)} non-finite cases, {len(blob)} bytes of data, torch {torch.__version__}")


if __name__ == "__main__":
    main()
