"""The real launchers in the tests: a 2-node SLURM cluster and an ssh server for DeepSpeed's pdsh
runner, both on this one machine (scripts in tests/cluster/), and what the tests share about them.

Each fixture uses the service when it is running, starts it when it is not (and then stops it
at the end), and skips with one line saying how to install it when its packages are missing.
CI sets IMAGEN_TRAIN_REQUIRE_CLUSTER=1 (.ci/run), which turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from train_helpers import REPO

CLUSTER = REPO / "tests" / "cluster"
SLURM_DIR = Path(os.environ.get("IMAGEN_TRAIN_SLURM_DIR", "/tmp/imagen-train-slurm"))
SSHD_DIR = Path(os.environ.get("IMAGEN_TRAIN_SSHD_DIR", "/tmp/imagen-train-sshd"))
SSH_HOSTS = ("imagen-host-1", "imagen-host-2")
REQUIRE = "IMAGEN_TRAIN_REQUIRE_CLUSTER"


def missing_or_skip(what: str, needs: dict[str, str], packages: str) -> None:
    """Skip (fail under IMAGEN_TRAIN_REQUIRE_CLUSTER=1) when a program is missing or we are not root."""
    missing = [name for name, path in needs.items() if not shutil.which(path)]
    if not missing and os.geteuid() == 0:
        return
    why = f"missing {', '.join(missing)}" if missing else "needs root"
    line = (f"{what} tests need the real daemons ({why}): as root, "
            f"`apt-get install -y {packages}`; .ci/run does it")
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{line} ({REQUIRE}=1: CI never skips them)", pytrace=False)
    pytest.skip(line)


@contextmanager
def _service(script: str, env: dict[str, str]) -> Iterator[None]:
    """Use the service if it answers; else start it, and stop it again afterwards."""
    run = lambda action: subprocess.run(["bash", str(CLUSTER / script), action], env={**os.environ, **env},  # noqa: E731
                                        capture_output=True, text=True, timeout=120)
    started = False
    if run("status").returncode != 0:
        up = run("up")
        assert up.returncode == 0, f"{script} up failed:\n{up.stdout}{up.stderr}"
        started = True
    try:
        yield
    finally:
        if started:
            run("down")


def slurm_service() -> Iterator[dict[str, str]]:
    """The environment that reaches the 2-node cluster (SLURM_CONF), for a fixture."""
    missing_or_skip("SLURM", {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "sbatch",
                              "munged": "munged"}, "slurmctld slurmd slurm-client munge")
    env = {"SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    with _service("slurm.sh", env):
        yield env


def sshd_service() -> Iterator[dict[str, str]]:
    """The environment that makes pdsh reach imagen-host-1 and -2 over ssh, for a fixture."""
    missing_or_skip("deepspeed --hostfile", {"sshd": "/usr/sbin/sshd", "ssh": "ssh", "pdsh": "pdsh"},
                    "openssh-server pdsh")
    env = {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": f"-F {SSHD_DIR / 'ssh_config'}"}
    with _service("sshd.sh", env):
        yield env


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (a run folder, a job's step name)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or ()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def wait_none_left(texts: list[str], bound_s: float, log: str = "") -> None:
    """Wait up to `bound_s` for every process mentioning any of `texts` to be gone; fail naming them."""
    deadline = time.monotonic() + bound_s
    while True:
        left = [p for text in texts for p in processes_mentioning(text) if p.pid != os.getpid()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = []
    for p in left:
        try:
            names.append((p.pid, " ".join(p.cmdline())[:160]))
        except psutil.Error:
            pass
    assert not names, f"processes left {bound_s} s on: {names}\n{log[-4000:]}"
