"""Time the ResBlock's GroupNorm -> FiLM -> SiLU region four ways, forward + backward, and GroupNorm
on a half-precision input two ways, with their error against a float64 reference.

    python bench/norm_act.py [--threads 2] [--batch 8] [--preset 35m|tiny|500m]
        [--layout channels_last|contiguous] [--dtype fp32|bf16|fp16] [--device auto|cpu|cuda] [--json OUT]

The region, `silu(group_norm(h) * (1 + scale) + shift)`:
- eager: the composition, what ResBlock runs where the fused path does not apply;
- folded: the GroupNorm affine folded into the FiLM scale and shift, one `addcmul` instead of a
  multiply and an add;
- compiled: the eager function through `torch.compile` (inductor), i.e. a fused
  GroupNorm + FiLM + SiLU kernel, compiled for this region only (the GPU's fused path: what
  regional compile makes of every ResBlock);
- fused: `imagen_train.models.norm_act`'s autograd function (affine and FiLM folded into one gain
  and offset, only the input kept for backward), what ResBlock runs where `fused_applies` says so
  in "auto" (the last column).

GroupNorm alone, in bf16/fp16 (`--dtype`): `gn` is GroupNorm32 as it runs now (the input handed
to PyTorch's kernel, float32 statistics), `gn-fp32-copy` the old path (a float32 copy of the
input first). For each: ms per forward + backward, the bytes autograd keeps for backward, and the
largest error of the output and of the input gradient against float64, in units of the reference's
largest magnitude. That is the numerics figure of GroupNorm without the copy on the device at hand
(on CUDA the saved statistics are in the input's dtype, on a CPU in float32).

Presets: `35m`, base64-35m's maps with 32 groups (128 ch x 64 px is the decoder's first GroupNorm
over [h; skip]); `500m`, base64-500m's (the GPU preset); `tiny`, the tiny and quickstart presets'
maps with 4 groups; `smoke`, one small map (a rehearsal). Each variant runs twice, interleaved, 3 warm-up and 10 timed forward +
backward passes each (backward from a fixed random gradient); the median per run is printed, in
milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imagen_train.models.layers import GroupNorm32  # noqa: E402
from imagen_train.models.norm_act import fused_applies, fused_norm_film_silu  # noqa: E402

GROUPS = 32
PRESETS = {  # groups, [(channels, resolution)]
    "35m": (GROUPS, [(64, 64), (128, 64), (128, 32), (192, 16), (256, 8)]),
    "500m": (GROUPS, [(256, 64), (512, 64), (512, 32), (768, 16), (1024, 8)]),
    "tiny": (4, [(4, 256), (8, 128), (8, 64), (16, 64), (16, 32), (32, 16)]),
    "smoke": (4, [(8, 32)]),  # one small map: bench/gpu_check.sh's CPU rehearsal
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager(h, weight, bias, scale, shift, groups=GROUPS):
    return F.silu(F.group_norm(h, groups, weight, bias, 1e-5) * (1 + scale) + shift)


def folded(h, weight, bias, scale, shift, groups=GROUPS):
    gain = weight[None, :, None, None] * (1 + scale)
    offset = bias[None, :, None, None] * (1 + scale) + shift
    return F.silu(torch.addcmul(offset, F.group_norm(h, groups, None, None, 1e-5), gain))


def fused(h, weight, bias, scale, shift, groups=GROUPS):
    return fused_norm_film_silu(h, weight, bias, scale, shift, groups, 1e-5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, args, grad, warmup: int = 3, steps: int = 10) -> float:
    device = grad.device
    for _ in range(warmup):
        fn(*args).backward(grad)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn(*args).backward(grad)
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def saved_bytes(fn, args) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward of `fn(*args)`."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def groupnorm_errors(norm: GroupNorm32, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Largest error of GroupNorm32's output and input gradient against float64, relative to the
    reference's largest magnitude."""
    ref_x = x.detach().double().requires_grad_()
    ref = F.group_norm(ref_x, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad.double())
    x = x.detach().requires_grad_()
    out = norm(x)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    out, ref = out.detach().double(), ref.detach()
    return {"out_err": float((out - ref).abs().max() / ref.abs().max()),
            "grad_err": float((x_grad.double() - ref_grad).abs().max() / ref_grad.abs().max())}


def groupnorm_rows(channels: int, res: int, groups: int, batch: int, dtype: torch.dtype, fmt, device) -> dict:
    """GroupNorm32 on a half-precision input: as it runs now and through the old float32 copy."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(batch, channels, res, res, generator=gen, device=device) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(batch, channels, res, res, generator=gen, device=device).to(dtype).contiguous(memory_format=fmt)
    row: dict[str, Any] = {}
    for name, upcast in (("gn", False), ("gn-fp32-copy", True)):
        norm = GroupNorm32(groups, channels).to(device)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        norm = norm.to(dtype)
        norm.upcast_input = upcast
        row[name] = {"ms": median_ms(norm, (x,), grad), "saved_bytes": saved_bytes(norm, (x,)),
                     **groupnorm_errors(norm, x, grad)}
    return row


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="35m")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variant (inductor)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype]
    groups, shapes = PRESETS[args.preset]
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    variants = {"eager": eager, "folded": folded, "fused": fused}
    if not args.no_compile:
        variants["compiled"] = torch.compile(eager, dynamic=False)
    header = (f"torch {torch.__version__}, {device}, {args.dtype}, {args.threads} threads, batch {args.batch}, "
              f"{groups} groups, {args.layout}; median ms per forward + backward")
    print(header)
    result: dict[str, Any] = {"header": header, "device": str(device), "dtype": args.dtype, "preset": args.preset,
                              "layout": args.layout, "batch": args.batch, "shapes": []}
    for channels, res in shapes:
        make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
        h = make(args.batch, channels, res, res).contiguous(memory_format=fmt)
        grad = make(args.batch, channels, res, res).contiguous(memory_format=fmt)
        inputs = (h.requires_grad_(), make(channels).requires_grad_(), make(channels).requires_grad_(),
                  make(args.batch, channels, 1, 1).requires_grad_(), make(args.batch, channels, 1, 1).requires_grad_(),
                  groups)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):
            for name, fn in variants.items():
                runs[name].append(median_ms(fn, inputs, grad))
        cells = ", ".join(f"{name} {' / '.join(f'{t:.2f}' for t in times)}" for name, times in runs.items())
        applies = fused_applies(h, torch.nn.GroupNorm(groups, channels))
        shape = {"channels": channels, "resolution": res, "region_ms": runs, "resblock_fuses": applies}
        line = f"{channels} ch x {res} px ({channels * res * res} per sample): {cells}; ResBlock fuses: " \
               f"{'yes' if applies else 'no'}"
        if dtype != torch.float32:
            shape["groupnorm"] = gn = groupnorm_rows(channels, res, groups, args.batch, dtype, fmt, device)
            line += "; " + ", ".join(f"{name} {v['ms']:.2f} ms, keeps {v['saved_bytes'] / 2**20:.1f} MiB, "
                                     f"error out {v['out_err']:.1e} grad {v['grad_err']:.1e}" for name, v in gn.items())
        result["shapes"].append(shape)
        print(line, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
