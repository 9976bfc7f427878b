"""Launching tiny 2-rank CPU training jobs: the tests' runs and bench/kill_resume.py's.

One copy for both: bench imports no test module; tests/train_helpers.py re-exports these.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagen_train.utils.cpu_env import with_cpu_malloc_tunables  # noqa: E402

# Hooks the ranks load from outside the package (tests/hooks/sitecustomize.py): stop phases and
# faults, for the tests and bench/kill_resume.py; a run without their variables never loads them.
HOOKS = REPO / "tests" / "hooks"
HOOK_VARIABLES = ("IMAGEN_TRAIN_TEST_PAUSE", "IMAGEN_TRAIN_FAULT_")


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it): never a hard-coded one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(run_dir: Path, shards: str, embed_dim: int, zero_stage: int = 2,
                   max_steps: int = 10, **extra) -> list[str]:
    """Settings that make a tiny preset train in seconds on 2 CPU ranks."""
    sets = {
        "run_dir": str(run_dir),
        "data.train_shards": shards,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "text.embed_dim": embed_dim,
        "text.max_length": 16,
        "training.precision": "fp32",
        "training.zero_stage": zero_stage,
        "training.micro_batch_size": 4,
        "training.global_batch_size": 8,
        "training.max_steps": max_steps,
        "training.log_every_steps": 1,
        "optim.lr": 1e-3,
        "lr_schedule.warmup_steps": 0,
        "ema.decay": 0.9,
        "checkpoint.every_steps": 10,
        "checkpoint.keep_last": 5,
        "logging.wandb_mode": "disabled",
        "logging.progress_bar": False,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def launch_command(config: str, overrides: list[str], nproc: int = 2, resume: str = "auto") -> list[str]:
    """torchrun of launch/train.py with `configs/<config>` and `--set` overrides, on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "launch" / "train.py"),
           "--config", str(REPO / "configs" / config), "--resume", resume]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def train_env(**extra: str) -> dict[str, str]:
    """This environment for a CPU run: DeepSpeed's CPU accelerator, one thread a rank, the repo
    importable, and the test hooks (tests/hooks, a sitecustomize: stop phases, faults) on the
    path when `extra` sets one of their variables."""
    env = dict(os.environ)
    hooks = [str(HOOKS)] if any(key.startswith(HOOK_VARIABLES) for key in extra) else []
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(hooks + [str(REPO), env.get("PYTHONPATH", "")]))
    env = with_cpu_malloc_tunables(env)  # as launch/quickstart.py runs its ranks
    env.update(extra)
    return env


def run_training(config: str, overrides: list[str], nproc: int = 2, resume: str = "auto",
                 timeout: int = 300, expect_rc: int = 0, **env) -> subprocess.CompletedProcess:
    """Run `launch_command` to its end; AssertionError with the output's tail on another exit status."""
    proc = subprocess.run(launch_command(config, overrides, nproc, resume), cwd=REPO,
                          env=train_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f"training exited {proc.returncode} (expected {expect_rc})\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict a logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
