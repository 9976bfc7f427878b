"""Time the ResBlock's GroupNorm -> FiLM -> SiLU region four ways, forward + backward, on a CPU.

    python bench/norm_act.py [--threads 2] [--batch 8] [--preset 35m|tiny] [--layout channels_last|contiguous]

- eager: the composition `silu(group_norm(h) * (1 + scale) + shift)`, what ResBlock runs where the
  fused path does not apply;
- folded: the GroupNorm affine folded into the FiLM scale and shift, one `addcmul` instead of a
  multiply and an add;
- compiled: the eager function through `torch.compile` (inductor), i.e. a fused
  GroupNorm + SiLU kernel, compiled for this region only;
- fused: `imagen_train.models.norm_act`'s autograd function (affine and FiLM folded into one gain
  and offset, only the input kept for backward), what ResBlock runs where `fused_applies` says so
  in its default mode, "auto" (the last column).

Presets: `35m`, base64-35m's maps with 32 groups (128 ch x 64 px is the decoder's first
GroupNorm over [h; skip]); `tiny`, the tiny and quickstart presets' maps with 4 groups. Each
variant runs twice, interleaved (A/B/C/D/A/B/C/D), 3 warm-up and 10 timed forward + backward
passes each (backward from a fixed random gradient); the median per run is printed, in
milliseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imagen_train.models.norm_act import fused_applies, fused_norm_film_silu  # noqa: E402

GROUPS = 32
PRESETS = {  # groups, [(channels, resolution)]
    "35m": (GROUPS, [(64, 64), (128, 64), (128, 32), (192, 16), (256, 8)]),
    "tiny": (4, [(4, 256), (8, 128), (8, 64), (16, 64), (16, 32), (32, 16)]),
}


def eager(h, weight, bias, scale, shift, groups=GROUPS):
    return F.silu(F.group_norm(h, groups, weight, bias, 1e-5) * (1 + scale) + shift)


def folded(h, weight, bias, scale, shift, groups=GROUPS):
    gain = weight[None, :, None, None] * (1 + scale)
    offset = bias[None, :, None, None] * (1 + scale) + shift
    return F.silu(torch.addcmul(offset, F.group_norm(h, groups, None, None, 1e-5), gain))


def fused(h, weight, bias, scale, shift, groups=GROUPS):
    return fused_norm_film_silu(h, weight, bias, scale, shift, groups, 1e-5)


def median_ms(fn, args, grad, warmup: int = 3, steps: int = 10) -> float:
    for _ in range(warmup):
        fn(*args).backward(grad)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn(*args).backward(grad)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="35m")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    groups, shapes = PRESETS[args.preset]
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    variants = {"eager": eager, "folded": folded, "compiled": torch.compile(eager, dynamic=False), "fused": fused}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {groups} groups, {args.layout}; "
          "median ms per forward + backward")
    for channels, res in shapes:
        h = torch.randn(args.batch, channels, res, res).contiguous(memory_format=fmt)
        grad = torch.randn(args.batch, channels, res, res).contiguous(memory_format=fmt)
        inputs = (h.requires_grad_(), torch.randn(channels, requires_grad=True),
                  torch.randn(channels, requires_grad=True),
                  torch.randn(args.batch, channels, 1, 1, requires_grad=True),
                  torch.randn(args.batch, channels, 1, 1, requires_grad=True), groups)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):
            for name, fn in variants.items():
                runs[name].append(median_ms(fn, inputs, grad))
        cells = ", ".join(f"{name} {' / '.join(f'{t:.2f}' for t in times)}" for name, times in runs.items())
        applies = fused_applies(h, torch.nn.GroupNorm(groups, channels))
        print(f"{channels} ch x {res} px ({channels * res * res} per sample): {cells}; "
              f"ResBlock fuses: {'yes' if applies else 'no'}", flush=True)


if __name__ == "__main__":
    main()
