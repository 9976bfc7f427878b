"""The trainer's speed against the bare step, side by side in one process.

    python bench/trainer_overhead.py --config configs/quickstart-base64.yaml [--batch 16]
        [--steps 10] [--rounds 4] [--threads 2] [--workers 1] [--set key=value ...]
        [--profile N] [--json OUT]

It runs the real `Trainer` (one rank, DeepSpeed with the config's ZeRO stage, the real loader
reading synthetic shards with precomputed embeddings, the EMA, the checks and the logging) and,
from inside one of its step callbacks, rounds of bench/train_step.py's bare step (forward,
backward, clip, fused AdamW on a synthetic batch, no DeepSpeed) on a second copy of the same
network at the same batch. The two alternate: trainer round, bare round, trainer round, ... so
a shared machine's slow spells touch both alike.

A trainer step is timed from the return of the previous step's callbacks to the call of this
step's: everything the training loop does for one step (data wait, host-to-device copy, loss,
backward, DeepSpeed's step, the EMA update, checks, logging), except checkpoints (set far
apart here) and the callbacks themselves. The first step of each round is not timed, as in
train_step.py (`--settle`).

Reported: median step time and samples/s of each, and trainer / bare. The target is >= 0.95.
--profile N also records N trainer steps under torch.profiler and prints the ops that cost
the most host time per step, so the overhead can be found and named.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import train_step  # noqa: E402
from imagen_train.config import Config, load_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env() -> None:
    """Environment for a one-rank process group in this process (what a launcher would set)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)


def make_shards(folder: Path, cfg: Config, num_samples: int) -> str:
    """Synthetic shards at the stage's output size with embeddings of a random T5 of the config's width."""
    from data_tools.precompute import precompute_embeddings
    from data_tools.synthetic import write_synthetic
    from imagen_train.text.tiny import build_tiny_t5

    encoder = build_tiny_t5(folder / "t5", d_model=cfg.text.embed_dim, num_layers=1, seed=0)
    raw = folder / "raw"
    write_synthetic(out=raw, num_samples=num_samples, resolution=cfg.output_resolution, shard_size=64, seed=0,
                    image_format="png", progress_bar=False)
    out = folder / "emb"
    precompute_embeddings(shards=sorted(str(p) for p in raw.glob("*.tar")), encoder=str(encoder), out=out,
                          batch_size=64, progress_bar=False)
    urls = sorted(out.glob("*.tar"))
    return str(out / f"{{00000..{len(urls) - 1:05d}}}.tar")


class Alternator:
    """A trainer callback: times the trainer's steps and runs the bare step's rounds in between."""

    def __init__(self, bare: train_step.Trainable, batch: dict, steps: int, rounds: int, warmup: int,
                 profile_steps: int):
        self.bare, self.batch = bare, batch
        self.steps, self.rounds, self.warmup = steps, rounds, warmup
        self.profile_steps = profile_steps
        self.trainer_times: list[float] = []
        self.last_exit: Optional[float] = None
        self.in_round = 0  # trainer steps taken in the current round
        self.rounds_done = 0
        self.profiler = None
        self.averages = None

    @property
    def total_steps(self) -> int:
        """Trainer steps the run needs: warm-up, then per round one settling step and the timed ones."""
        return self.warmup + self.rounds * (1 + self.steps) + self.profile_steps

    def __call__(self, trainer) -> None:
        now = time.perf_counter()
        step = trainer.step
        if step <= self.warmup:
            if step == self.warmup:
                train_step.prepare(self.bare, self.batch, warmup=1)
        elif self.rounds_done < self.rounds:
            if self.in_round > 0:  # the first step after a bare round settles, untimed
                self.trainer_times.append(now - self.last_exit)
            self.in_round += 1
            if self.in_round == 1 + self.steps:
                train_step.timed_steps(self.bare, self.batch, self.steps, settle=1)
                self.in_round = 0
                self.rounds_done += 1
                if self.rounds_done == self.rounds and self.profile_steps:
                    self._start_profile()
        elif self.profiler is not None:
            self.profiler.step()
        self.last_exit = time.perf_counter()

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities,
                                schedule=schedule(wait=0, warmup=1, active=max(1, self.profile_steps - 1)),
                                on_trace_ready=self._keep_averages)
        self.profiler.__enter__()

    def _keep_averages(self, prof) -> None:
        self.averages = prof.key_averages()

    def profile_table(self, top: int) -> str:
        if self.profiler is None:
            return ""
        self.profiler.__exit__(None, None, None)
        if self.averages is None:
            return "profile: no complete profiling cycle (raise --profile)"
        steps = max(1, self.profile_steps - 1)
        rows = sorted(self.averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        lines = [f"torch.profiler over {steps} trainer step(s): self host time per step",
                 "| op | calls/step | self ms/step | total ms/step |", "|---|---|---|---|"]
        for e in rows:
            lines.append(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.2f} | "
                         f"{e.cpu_time_total / 1e3 / steps:.2f} |")
        return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart-base64.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batch", type=int, help="micro = global batch (default: training.micro_batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round, each side")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="untimed trainer steps first")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--shards", help="existing shards with embeddings of the config's width "
                                         "(default: synthetic ones made in a temporary folder)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many trainer steps at the end")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    single_rank_env()
    # After the environment: importing the trainer imports DeepSpeed.
    from imagen_train.training.trainer import Trainer
    from imagen_train.utils import dist

    base = load_config(args.config, args.set)
    batch_size = args.batch or base.training.micro_batch_size
    with tempfile.TemporaryDirectory(prefix="trainer-overhead-") as tmp:
        tmp = Path(tmp)
        shards = args.shards or make_shards(tmp / "data", base, num_samples=max(256, 2 * batch_size))
        overrides = list(args.set) + [
            f"data.train_shards={shards}", f"data.num_workers={args.workers}", f"run_dir={tmp / 'run'}",
            f"training.micro_batch_size={batch_size}", f"training.global_batch_size={batch_size}",
            "training.grad_accum_steps=null", "checkpoint.every_steps=1000000", "logging.wandb_mode=disabled",
            "logging.progress_bar=false", "evaluation.eval_every_steps=0"]
        cfg = load_config(args.config, overrides)
        dtype = train_step.DTYPES[cfg.training.precision]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bare = train_step._ours(cfg, dtype, device)
        alternator = Alternator(bare, train_step.synthetic_batch(cfg, batch_size, device), args.steps,
                                args.rounds, args.warmup, args.profile)
        cfg.training.max_steps = alternator.total_steps
        trainer = Trainer(cfg, resume="none", callbacks=[alternator])
        trainer.run()
        profile = alternator.profile_table(args.top)
        dist.shutdown()

    trainer_s = statistics.median(alternator.trainer_times)
    bare_s = statistics.median(bare.times)
    result = {
        "device": train_step.device_name(device), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": os.getloadavg(),
        "config": args.config, "overrides": args.set, "batch": batch_size, "precision": cfg.training.precision,
        "zero_stage": cfg.training.zero_stage, "workers": args.workers, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "steps_per_round": args.steps,
        "trainer_step_s": alternator.trainer_times, "bare_step_s": bare.times,
        "trainer_step_s_median": trainer_s, "bare_step_s_median": bare_s,
        "trainer_samples_per_s": batch_size / trainer_s, "bare_samples_per_s": batch_size / bare_s,
        "ratio": bare_s / trainer_s,
    }
    print(f"device: {result['device']}; torch {result['torch']}; {args.config} {' '.join(args.set)}".rstrip())
    print(f"batch {batch_size}, {cfg.training.precision}, ZeRO-{cfg.training.zero_stage}, {args.workers} data "
          f"worker(s), {result['threads']} threads; {args.rounds} rounds of {args.steps} timed steps each side")
    print(f"| | step ms (median) | samples/s |\n|---|---|---|\n"
          f"| trainer | {trainer_s * 1e3:.1f} | {result['trainer_samples_per_s']:.1f} |\n"
          f"| bare step | {bare_s * 1e3:.1f} | {result['bare_samples_per_s']:.1f} |")
    print(f"trainer / bare samples/s: {result['ratio']:.3f} (target >= 0.95)")
    if profile:
        print(profile)
        result["profile"] = profile
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
