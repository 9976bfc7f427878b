"""How long a checkpoint save takes, measured at small sizes and extrapolated by bytes to the presets.

    python bench/checkpoint_save.py [--presets base64-tiny sr256-tiny sr1024-tiny base64-35m]
                                    [--repeats 3] [--work /tmp/ckpt-bench] [--json out.json]

One process (world size 1, gloo), fp32, ZeRO-2, text.embed_dim 64 (the synthetic shards' tiny T5).
For each preset it builds a Trainer, trains one step (so Adam's moments exist), then times
`Trainer.save_checkpoint()` `--repeats` times: DeepSpeed's files, our rank state, every file's
sha256 for the manifest, the commit and the pruning of older checkpoints. It fits
seconds = fixed + bytes / rate over the presets measured, then extrapolates by bytes (an
extrapolation, not a measurement) to each full preset, bf16 with ZeRO 1-2: rank 0 writes the
bf16 weights (2 B/param) and every rank its slice of the fp32 masters and Adam's two moments
(12 B/param / ranks) and of the EMA (4 B/param / ranks, fp32: an upper bound). It prints rank
0's save on 8 and 64 ranks, and the whole save of one 8-rank node (2 + 16 B/param) through one
disk at the fitted rate, against SLURM's default KillWait and the sbatch script's advance
warning, whose lead follows from the slowest node save (`usr1_lead_s`).
The rate is this machine's disk and one CPU core's hashing: scale by your filesystem's rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

FULL_PRESETS = ("base64-2b", "base64-500m", "sr256-400m", "sr1024-400m")
RANKS = (8, 64)
RANKS_PER_NODE = 8
KILL_WAIT_S = 30  # SLURM's default KillWait: SIGTERM (scancel, preemption) to SIGKILL


def make_shards(work: Path) -> dict[int, str]:
    """Synthetic shards with tiny-T5 embeddings: 64 px (base stage) and 1024 px (SR stages)."""
    from data_tools.precompute import precompute_embeddings
    from data_tools.synthetic import write_synthetic
    from imagen_train.text.tiny import build_tiny_t5

    t5 = work / "t5"
    if not t5.exists():
        build_tiny_t5(t5, d_model=64, num_layers=2, seed=0)
    patterns = {}
    for res, count in ((64, 16), (1024, 4)):
        raw, out = work / f"raw{res}", work / f"emb{res}"
        if not out.exists():
            write_synthetic(out=raw, num_samples=count, resolution=res, shard_size=count, seed=0,
                            image_format="jpg" if res > 64 else "png", progress_bar=False)
            precompute_embeddings(shards=sorted(str(p) for p in raw.glob("*.tar")), encoder=str(t5),
                                  out=out, batch_size=16, progress_bar=False)
        patterns[res] = str(sorted(out.glob("*.tar"))[0])
    return patterns


def measure(preset: str, shards: dict[int, str], work: Path, repeats: int) -> dict:
    from imagen_train.config import load_preset
    from imagen_train.training.trainer import Trainer

    run_dir = work / "runs" / preset
    cfg = load_preset(preset, [
        f"run_dir={run_dir}", f"data.train_shards={shards[64 if preset.startswith('base') else 1024]}",
        "data.num_workers=0", "data.shuffle_buffer=4", "text.embed_dim=64", "training.precision=fp32",
        "training.zero_stage=2", "training.micro_batch_size=1", "training.global_batch_size=1",
        "training.max_steps=1", "checkpoint.every_steps=1000000", "checkpoint.keep_last=2",
        "logging.wandb_mode=disabled", "logging.progress_bar=false", "evaluation.eval_every_steps=0"])
    trainer = Trainer(cfg, resume="none")
    trainer.run()  # one step and its save (not timed: the first save also warms the file cache)
    params = sum(p.numel() for p in trainer.engine.deepspeed.module.parameters() if p.requires_grad)
    seconds, size = [], 0
    for _ in range(repeats):
        trainer.step += 1
        start = time.perf_counter()
        folder = trainer.save_checkpoint()
        seconds.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"preset": preset, "params": params, "bytes": size, "seconds": seconds,
            "median_s": statistics.median(seconds)}


def full_preset_params() -> dict[str, int]:
    from imagen_train.config import load_preset
    from imagen_train.models import build_model

    out = {}
    for name in FULL_PRESETS:
        cfg = load_preset(name)
        with torch.device("meta"):  # counts only: no memory, no initialisation
            net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
        out[name] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return out


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least squares seconds = fixed + bytes / rate; returns (fixed_s, rate in bytes/s)."""
    xs, ys = [r["bytes"] for r in rows], [r["median_s"] for r in rows]
    if len(set(xs)) < 2:  # one size: no fixed part can be told apart
        return 0.0, sum(xs) / sum(ys)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - slope * mx), 1.0 / slope


def usr1_lead_s(slowest_node_save_s: float) -> int:
    """The advance warning to ask SLURM for (`--signal=B:USR1@N`): twice the slowest node's
    save, rounded up to whole minutes. Twice: headroom for a filesystem at half the measured
    rate and for the step or evaluation batch in progress when the warning comes. (slurmctld
    checks time limits every 30 s and sends the warning up to 30 s early, never late.)"""
    return int(math.ceil(2 * slowest_node_save_s / 60.0)) * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base64-tiny", "sr256-tiny", "sr1024-tiny", "base64-35m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ckpt-bench")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.work)
    rows = []
    for preset in args.presets:
        row = measure(preset, shards, args.work, args.repeats)
        rows.append(row)
        print(f"{preset:12s} {row['params'] / 1e6:8.2f}M params {row['bytes'] / 2**20:9.1f} MiB "
              f"median {row['median_s']:.2f} s  ({', '.join(f'{s:.2f}' for s in row['seconds'])})", flush=True)
    fixed, rate = fit(rows)
    print(f"fit: {fixed:.2f} s + bytes / {rate / 2**20:.0f} MiB/s")
    estimates, nodes = [], []
    for name, params in full_preset_params().items():
        for ranks in RANKS:
            size = 2 * params + 16 * params / ranks
            estimates.append({"preset": name, "params": params, "ranks": ranks, "rank0_bytes": size,
                              "estimated_s": fixed + size / rate})
            print(f"{name:12s} {params / 1e6:7.0f}M params, {ranks:2d} ranks: rank 0 writes "
                  f"{size / 2**30:5.1f} GiB, ~{fixed + size / rate:5.0f} s at the fitted rate (extrapolated)")
        node = 18 * params  # one node of RANKS_PER_NODE ranks: rank 0's weights and every slice
        nodes.append({"preset": name, "params": params, "node_bytes": node, "node_s": fixed + node / rate})
    lead = usr1_lead_s(max(n["node_s"] for n in nodes))
    print(f"one {RANKS_PER_NODE}-rank node through one disk at the fitted rate (extrapolated); "
          f"KillWait {KILL_WAIT_S} s; advance warning {lead} s:")
    for n in nodes:
        print(f"{n['preset']:12s} node writes {n['node_bytes'] / 2**30:5.1f} GiB, ~{n['node_s']:5.0f} s: "
              f"{'fits' if n['node_s'] <= KILL_WAIT_S else 'does not fit'} KillWait, "
              f"{'fits' if n['node_s'] <= lead else 'does not fit'} the warning's lead")
    print(f"usr1 lead: {lead} s (twice the slowest node save, in whole minutes)")
    if args.json:
        args.json.write_text(json.dumps({"measured": rows, "fixed_s": fixed, "rate_bytes_per_s": rate,
                                         "estimates": estimates, "nodes": nodes, "usr1_lead_s": lead,
                                         "kill_wait_s": KILL_WAIT_S}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
