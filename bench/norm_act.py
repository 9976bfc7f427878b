"""Time the ResBlock's GroupNorm -> FiLM -> SiLU region three ways, forward + backward, on a CPU.

    python bench/norm_act.py [--threads 2] [--batch 8]

- eager: what `imagen_train.models.layers.ResBlock` runs, `silu(group_norm(h) * (1 + scale) + shift)`;
- folded: the GroupNorm affine folded into the FiLM scale and shift, one `addcmul` instead of a
  multiply and an add;
- compiled: the eager function through `torch.compile` (inductor), i.e. the fused
  GroupNorm + SiLU kernel the issue asks about, compiled for this region only.

Shapes are base64-35m's (channels_last activations, 32 groups). Each variant runs twice,
interleaved (A/B/C/A/B/C), 3 warm-up and 10 timed steps each; the median per run is printed,
in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

GROUPS = 32
SHAPES = [(64, 64), (128, 32), (256, 8)]  # (channels, resolution) of base64-35m's levels


def eager(h, weight, bias, scale, shift):
    return F.silu(F.group_norm(h, GROUPS, weight, bias, 1e-5) * (1 + scale) + shift)


def folded(h, weight, bias, scale, shift):
    gain = weight[None, :, None, None] * (1 + scale)
    offset = bias[None, :, None, None] * (1 + scale) + shift
    return F.silu(torch.addcmul(offset, F.group_norm(h, GROUPS, None, None, 1e-5), gain))


def median_ms(fn, args, warmup: int = 3, steps: int = 10) -> float:
    for _ in range(warmup):
        fn(*args).sum().backward()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn(*args).sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"eager": eager, "folded": folded, "compiled": torch.compile(eager, dynamic=False)}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}; median ms per forward + backward")
    for channels, res in SHAPES:
        h = torch.randn(args.batch, channels, res, res).contiguous(memory_format=torch.channels_last)
        inputs = (h.requires_grad_(), torch.randn(channels, requires_grad=True),
                  torch.randn(channels, requires_grad=True),
                  torch.randn(args.batch, channels, 1, 1, requires_grad=True),
                  torch.randn(args.batch, channels, 1, 1, requires_grad=True))
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):
            for name, fn in variants.items():
                runs[name].append(median_ms(fn, inputs))
        cells = ", ".join(f"{name} {' / '.join(f'{t:.2f}' for t in times)}" for name, times in runs.items())
        print(f"{channels} ch x {res} px: {cells}", flush=True)


if __name__ == "__main__":
    main()
