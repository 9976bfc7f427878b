"""One sampling network call in the contiguous format against channels_last, per quickstart stage.

    python bench/sampling_memory_format.py [--stages base64 sr256 sr1024] [--batch-sizes 16 16 1]
        [--reps 4] [--threads 2] [--json OUT]

Each stage's network is built from its quickstart config (configs/quickstart-<stage>.yaml, random
weights: the time does not depend on them) and called as the samplers call it, through a
`NetworkCaller`, at the size the quickstart samples it (64, 256, 1024 px), without gradients. The
two formats alternate in one process, `--reps` times after one untimed call each; reported are
the median seconds per call and their ratio (contiguous / channels_last: above 1, channels_last
is faster). The cascade samples in `sampling_memory_format(device)` (channels_last on a CPU).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.diffusion.caller import NetworkCaller  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.stages import get_stage  # noqa: E402

FORMATS = {"contiguous": None, "channels_last": torch.channels_last}


def _inputs(cfg, resolution: int, batch: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(batch, cfg.text.max_length, cfg.text.embed_dim, generator=gen)
    args = [torch.randn(batch, 3, resolution, resolution, generator=gen), torch.ones(batch), text,
            torch.ones(batch, cfg.text.max_length, dtype=torch.bool)]
    if get_stage(cfg.stage).is_super_resolution:
        low = get_stage(cfg.stage).input_resolution
        args += [torch.randn(batch, 3, low, low, generator=gen), torch.full((batch,), 0.25)]
    return tuple(args)


def measure(stage: str, batch: int, reps: int) -> dict:
    """Median seconds per network call in each format, alternating, for one stage."""
    cfg = load_config(ROOT / "configs" / f"quickstart-{stage}.yaml")
    resolution = get_stage(cfg.stage).output_resolution
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).eval()
    args = _inputs(cfg, resolution, batch)
    callers = {name: NetworkCaller(net, memory_format=fmt) for name, fmt in FORMATS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    with torch.no_grad():
        for name, caller in callers.items():
            caller(*args)  # untimed: the first call picks kernels and grows the allocator
        for _ in range(reps):
            for name, caller in callers.items():
                start = time.perf_counter()
                caller(*args)
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    return {"stage": stage, "resolution": resolution, "batch": batch,
            "seconds_per_call": {k: round(v, 4) for k, v in median.items()},
            "contiguous_over_channels_last": round(median["contiguous"] / median["channels_last"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["base64", "sr256", "sr1024"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 16, 1],
                        help="one per stage: the quickstart's sampling batch (16, 16, 1 at 1024 px)")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if len(args.batch_sizes) != len(args.stages):
        parser.error(f"--batch-sizes needs one size per stage ({len(args.stages)}), got {len(args.batch_sizes)}")
    torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "reps": args.reps,
              "stages": [measure(s, b, args.reps) for s, b in zip(args.stages, args.batch_sizes)]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
