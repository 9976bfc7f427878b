"""Where a training step's time goes: torch.profiler over a few steps of bench/train_step.py's step.

    python bench/profile_step.py --config configs/base64-35m.yaml [--set key=value ...] [--peer]
        [--precision fp32|bf16] [--batch N] [--steps 2] [--threads 2] [--top 25]

Prints the step's time by kind of work (convolutions, attention, matmuls, normalisation,
elementwise and the rest) and the heaviest (op, input shapes) groups with their ms per step and,
for convolutions and matmuls, the GFLOP/s they reach, which says whether a kernel runs near the
machine's speed or has room left. --peer profiles the matched IF-I peer instead of ours.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

import train_step

KINDS = {  # op name -> kind; anything else is "other"
    "aten::mkldnn_convolution": "convolution", "aten::convolution_backward": "convolution",
    "aten::cudnn_convolution": "convolution",
    "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul", "aten::baddbmm": "matmul",
    "aten::native_group_norm": "normalisation", "aten::native_group_norm_backward": "normalisation",
    "aten::native_layer_norm": "normalisation", "aten::native_layer_norm_backward": "normalisation",
}
ELEMENTWISE = ("silu", "gelu", "add", "mul", "sub", "div", "copy_", "cat", "sum", "fill_", "addcmul")


def kind_of(name: str) -> str:
    if name in KINDS:
        return KINDS[name]
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if "adam" in name:
        return "optimizer"
    base = name.removeprefix("aten::").removeprefix("_")
    if base.split("_backward")[0] in ELEMENTWISE or base.rstrip("_") in ELEMENTWISE:
        return "elementwise"
    return "other"


def op_flops(name: str, shapes: list, concrete: list) -> Optional[int]:
    """FLOPs of one call from its input shapes: convolutions (forward; backward = input and weight
    gradients), mm / addmm / bmm, flash attention (bench/train_step.py's counts); None otherwise."""
    try:
        if name == "aten::mkldnn_convolution":
            x, w = shapes[0], shapes[1]  # (B, Cin, H, W), (Cout, Cin/groups, kh, kw)
            stride = concrete[4] if len(concrete) > 4 and concrete[4] else [1, 1]
            return 2 * x[0] * (x[2] // stride[0]) * (x[3] // stride[1]) * math.prod(w)
        if name == "aten::convolution_backward":
            grad, w = shapes[0], shapes[2]  # grad_out (B, Cout, H', W'), weight
            return 2 * 2 * grad[0] * grad[2] * grad[3] * math.prod(w)
        if "flash_attention" in name:  # q (B, h, N, d), k (B, h, S, d); backward as torch counts flash kernels
            backward = name.endswith("_backward")
            q, k = shapes[1:3] if backward else shapes[0:2]
            return (10 if backward else 4) * q[0] * q[1] * q[2] * k[2] * q[3]
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
    except (IndexError, TypeError, ValueError):
        return None
    return None


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--precision", choices=sorted(train_step.DTYPES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--peer", action="store_true", help="profile the matched IF-I peer instead of ours")
    parser.add_argument("--top", type=int, default=25, help="(op, shapes) groups to list")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.set) + ([f"training.precision={args.precision}"] if args.precision else [])
    cfg = train_step.load_config(args.config, overrides)
    dtype = train_step.DTYPES[cfg.training.precision]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = train_step.synthetic_batch(cfg, args.batch or cfg.training.micro_batch_size, device)
    net = train_step._ours(cfg, dtype, device)
    if args.peer:
        net = train_step._peer(cfg, net.num_params, dtype, device)
    for _ in range(2):
        net.step(batch)
    train_step.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            net.step(batch)
        train_step.synchronize(device)

    cuda = device.type == "cuda"
    by_kind: dict[str, float] = defaultdict(float)
    by_group: dict[tuple, dict] = {}
    for event in prof.events():
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3 / args.steps
        by_kind[kind_of(event.name)] += ms
        shapes = [s for s in event.input_shapes if s]
        concrete = list(getattr(event, "concrete_inputs", None) or [])
        key = (event.name, repr(shapes), repr(concrete))
        g = by_group.setdefault(key, {"op": event.name, "shapes": shapes[:3], "calls": 0, "ms": 0.0, "gflop": 0.0})
        g["calls"] += 1
        g["ms"] += ms
        flops = op_flops(event.name, event.input_shapes, concrete)
        g["gflop"] += (flops or 0) / 1e9 / args.steps
    total = sum(by_kind.values())
    groups = sorted(by_group.values(), key=lambda g: -g["ms"])
    for g in groups:
        g["calls"] //= args.steps
        g["gflops_per_s"] = g["gflop"] / (g["ms"] / 1e3) if g["gflop"] and g["ms"] > 0 else None

    print(f"{net.name}: {total:.0f} ms per step of profiled op time ({args.steps} steps)")
    print("| kind | ms per step | share |\n|---|---|---|")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {ms / total:.1%} |")
    print("\n| op | input shapes | calls per step | ms per step | GFLOP/s |\n|---|---|---|---|---|")
    for g in groups[:args.top]:
        rate = f"{g['gflops_per_s']:.0f}" if g["gflops_per_s"] else ""
        print(f"| {g['op']} | {g['shapes']} | {g['calls']} | {g['ms']:.1f} | {rate} |")
    return {"name": net.name, "total_ms": total, "by_kind": dict(by_kind), "groups": groups}


if __name__ == "__main__":
    main()
