"""Peak memory that one periodic evaluation adds beside training, relative to the network's size.

    python bench/eval_memory.py --presets base64-tiny base64-35m [--dtype fp32|bf16] [--steps 2]
        [--batch 4] [--json OUT]

One process, no DeepSpeed, world size 1: the EMA is held as the trainer holds it (one flat fp32
slice per parameter, here the whole parameter) before anything is measured. Then, per preset:

- `materialize_ema`: what periodic evaluation does now (imagen_train.training.ema_network, the
  callable the trainer hands the evaluator): a meta-device network given storage once in the
  sampling dtype and filled in place from the flat EMA, gathered in bounded windows.
- `before`: what it did until this change, rebuilt here for the comparison: the slices
  concatenated and gathered into one flat fp32 buffer, every parameter cut from it and cloned,
  a full fp32 network built (random init) and the clones loaded into it.

Each is measured twice: building the network only (`build`), and building it then drawing one
grid (`build+sample`: `--batch` images, `--steps` sampler steps, the stage's default sampler
with guidance, random text embeddings), then freeing it. Peak added memory = the RSS high-water
mark (VmHWM, reset through /proc/self/clear_refs after malloc_trim) above the RSS at the start,
as bench/train_step.py's PeakGrowth measures it on a CPU; on a GPU, max_memory_allocated above
the allocation at the start. One untimed round of each runs first, so one-off allocations
(thread pools, kernel caches) are not counted. Ratios are to the network's size in the
sampling dtype (`net`) and in fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from imagen_train.config import Config, load_preset  # noqa: E402
from imagen_train.diffusion import NetworkCaller, build_diffusion  # noqa: E402
from imagen_train.evaluation.periodic import free_memory  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.training.ema_network import EMANetwork  # noqa: E402
from train_step import PeakGrowth  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def before_network(cfg: Config, layout: dict, shadow: dict, device: torch.device) -> torch.nn.Module:
    """The evaluation network as periodic.py built it before (gather_ema_state + load_state_dict)."""
    names = list(layout)
    flat = torch.cat([shadow[n].reshape(-1) for n in names]).float()   # the all-gathered buffer
    pieces = flat.split([shadow[n].numel() for n in names])
    state = {n: p[: layout[n]["numel"]].reshape(layout[n]["shape"]).clone() for n, p in zip(names, pieces)}
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    net.load_state_dict(state, strict=True)
    del state, flat, pieces
    return net.to(device).eval().requires_grad_(False)


def draw(cfg: Config, net: torch.nn.Module, device: torch.device, batch: int, steps: int) -> None:
    """One grid of `batch` samples, as the evaluator draws it."""
    diffusion = build_diffusion(cfg.diffusion)
    sampler = replace(cfg.evaluation.sampler, steps=steps)
    gen = torch.Generator(device=device).manual_seed(0)
    res, L, D = cfg.train_resolution, cfg.text.max_length, cfg.text.embed_dim
    emb = torch.randn(batch, L, D, generator=gen, device=device)
    mask = torch.ones(batch, L, dtype=torch.bool, device=device)
    low = None
    if cfg.lowres_resolution:
        low = torch.rand(batch, 3, cfg.lowres_resolution, cfg.lowres_resolution, generator=gen, device=device) * 2 - 1
    with torch.no_grad():
        diffusion.sample(NetworkCaller(net), (batch, 3, res, res), emb, mask, sampler, lowres=low, generator=gen)


def measure(preset: str, dtype: torch.dtype, device: torch.device, batch: int, steps: int) -> dict:
    cfg = load_preset(preset, [])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    shadow = {n: p.detach().reshape(-1).clone().to(device) for n, p in net.named_parameters()}
    layout = {n: {"shape": list(p.shape), "numel": p.numel(), "start": 0, "end": p.numel()}
              for n, p in net.named_parameters()}
    numel = sum(p.numel() for p in net.parameters())
    del net
    gc.collect()
    net_bytes = numel * torch.finfo(dtype).bits // 8

    def run(method: str, sample: bool) -> None:
        if method == "materialize_ema":
            net = EMANetwork(cfg, layout, shadow)(dtype, device)
        else:
            net = before_network(cfg, layout, shadow, device)  # fp32, as it was
        if sample:
            draw(cfg, net, device, batch, steps)
        del net
        free_memory()

    row = {"preset": preset, "parameters": numel, "dtype": str(dtype).split(".")[-1],
           "net_bytes": net_bytes, "fp32_bytes": numel * 4}
    for sample in (False, True):
        for method in ("materialize_ema", "before"):
            run(method, sample)  # untimed round: one-off allocations
            with PeakGrowth(device) as g:
                run(method, sample)
            key = f"{method}/{'build+sample' if sample else 'build'}"
            row[key] = {"peak_added_bytes": g.bytes, "x_net": g.bytes / net_bytes,
                        "x_fp32": g.bytes / (numel * 4), "kind": g.kind}
            print(f"{preset} {row['dtype']} {key}: {g.bytes / 2**20:.1f} MiB = {g.bytes / net_bytes:.2f}x net "
                  f"({net_bytes / 2**20:.1f} MiB)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["base64-tiny"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="sampling dtype (default: bf16 on a GPU, fp32 on a CPU, as the evaluator)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from imagen_train.evaluation.periodic import sampling_dtype
    dtype = DTYPES[args.dtype] if args.dtype else sampling_dtype(device)
    rows = [measure(p, dtype, device, args.batch, args.steps) for p in args.presets]
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": str(device), "batch": args.batch,
           "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
