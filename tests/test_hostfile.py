"""`deepspeed --hostfile` across 2 hosts, through DeepSpeed's default multi-node runner.

The runner starts `pdsh`, which ssh-es into every host of the hostfile and starts
`deepspeed.launcher.launch` there. Here an sshd on 127.0.0.1 with a key made for the test
(tests/cluster/sshd.sh) answers for two host names, one slot each, so the real chain runs:
runner -> pdsh -> ssh -> sshd -> launch.py -> rank, twice.

What a SIGTERM to the `deepspeed` command does there (DeepSpeed 0.19.8, seen in this test): the
runner sends SIGINT and SIGTERM to pdsh, runs `pdsh ... pkill -f <launch.py's command>` on every
host and exits 1 a second later. pdsh's death closes the ssh sessions that carried every rank's
output, so a rank's next print raises BrokenPipeError: before launch/train.py kept its output
alive (`utils/signals.survive_closed_output`), rank 0 died there and no checkpoint was written.
The pkill reaches each `launch.py`, which SIGTERMs its rank (SIGKILL 30 s later); the ranks save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster_helpers import SSH_HOSTS, SSHD_DIR, sshd_service, wait_none_left
from imagen_train import artifacts
from imagen_train.training import checkpoint as ckpt
from train_helpers import REPO, free_port, tiny_overrides, train_env

pytestmark = pytest.mark.timeout(600)

MAX_STEPS, SIGNAL_AFTER = 400, 2
GONE_BOUND_S = 25  # under launch.py's 30 s SIGKILL: the ranks must end on their own


@pytest.fixture(scope="module")
def hosts():
    yield from sshd_service()


def _private_python(root: Path) -> Path:
    """This interpreter under a path of the test's own, with the same packages.

    On SIGTERM the runner runs `pkill -f '<python> -u -m deepspeed.launcher.launc'` on every host:
    a pattern that names only the interpreter, so it ends every `launch.py` started by that
    Python on the machine (another test's, under pytest-xdist, or another job's of the same venv
    on a shared node). Run from a path no other job uses, the pkill reaches this test's only.
    """
    (root / "bin").mkdir(parents=True)
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:  # the venv's packages: its pyvenv.cfg, and its lib/ under the new prefix
        (root / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
        (root / "lib").symlink_to(Path(sys.prefix) / "lib")
    else:
        home = Path(os.path.realpath(sys.executable)).parent
        (root / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = true\n")
    python = root / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    return python


def _decoy_launcher(python: str) -> subprocess.Popen:
    """A process whose command line is that of a `launch.py` started by `python`, as another job's."""
    argv0 = f"{python} -u -m deepspeed.launcher.launch --world_info=decoy"
    return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" sleep 600'], start_new_session=True)


def _sshd_sessions() -> list[psutil.Process]:
    """The session processes of our sshd (one per open ssh connection)."""
    try:
        return psutil.Process(int((SSHD_DIR / "sshd.pid").read_text())).children(recursive=True)
    except (OSError, ValueError, psutil.Error):
        return []


@pytest.mark.multirank
def test_hostfile_run_stops_on_sigterm_with_one_checkpoint(hosts, tmp_path, shards_64):
    """Train on 2 hosts x 1 rank, SIGTERM the `deepspeed` command: one complete checkpoint with
    both ranks' files, and no process left on either host (ranks, launch.py, pdsh, ssh, the
    sshd sessions)."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host} slots=1\n" for host in SSH_HOSTS))
    # What the remote shells must see besides PYTHON*, which the runner exports itself: read by
    # the runner from DS_ENV_FILE (a `.deepspeed_env` file), as on a real cluster. PATH too: an
    # ssh session's PATH finds another `ninja` than the venv's, and DeepSpeed's JIT comm op,
    # built by one ninja, is rebuilt by the other (minutes on this machine).
    ds_env = tmp_path / "deepspeed_env"
    ds_env.write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n" + "".join(
        f"{key}={os.environ[key]}\n" for key in ("PATH", "TORCH_EXTENSIONS_DIR") if key in os.environ))
    # The runner passes the arguments through each host's shell: a brace pattern would be
    # expanded there, so the shards are listed with '::'.
    sets = tiny_overrides(run_dir, "::".join(shards_64.urls), shards_64.embed_dim, max_steps=MAX_STEPS, **{
        "checkpoint.every_steps": 100000, "data.num_workers": 1, "data.shuffle_buffer": 8})
    python = _private_python(tmp_path / "python")
    cmd = [str(python), str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile),
           "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "base64-tiny.yaml")]
    for item in sets:
        cmd += ["--set", item]
    decoy = _decoy_launcher(sys.executable)  # another job's launch.py: the stop must leave it alone
    job = subprocess.Popen(cmd, cwd=tmp_path, env=train_env(**hosts, DS_ENV_FILE=str(ds_env)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True).start()
    try:
        metrics = run_dir / "metrics.jsonl"
        started = time.monotonic()
        deadline = started + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= SIGNAL_AFTER):
            assert job.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "training did not start\n" + "".join(lines)[-4000:]
            time.sleep(0.2)
        print(f"{SIGNAL_AFTER} steps trained {time.monotonic() - started:.0f} s after the start")
        launchers = [p for p in _sshd_sessions() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        assert len(launchers) == 2, "one launch.py per host, each under its own ssh session"
        job.send_signal(signal.SIGTERM)
        start = time.monotonic()
        wait_none_left([str(run_dir)], GONE_BOUND_S, "".join(lines))
        deadline = time.monotonic() + 10
        while _sshd_sessions() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _sshd_sessions(), [" ".join(p.cmdline()) for p in _sshd_sessions()]
        print(f"every process gone {time.monotonic() - start:.1f} s after the SIGTERM")
        job.wait(timeout=10)
        assert decoy.poll() is None, "the runner's pkill ended a launch.py that was not its job's"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        decoy.kill()
        decoy.wait()
    text = "".join(lines)
    assert job.returncode == 1, text[-4000:]  # the runner's own code after a signal
    root = run_dir / "checkpoints"
    (tag,) = ckpt.list_complete(root)
    artifacts.verify(root / tag)
    files = json.loads((root / tag / ckpt.MANIFEST).read_text())["files"]
    for r in range(2):  # each host's rank wrote its state and its optimizer partition
        assert {f"trainer_state_rank{r:05d}.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} <= files.keys()
    step = artifacts.step_of(tag)
    assert SIGNAL_AFTER <= step < MAX_STEPS
    # Rank 0's output after the ssh sessions closed went to its file, with the stop it honoured.
    kept = (run_dir / "output-rank0.log").read_text()
    assert "[train] stop requested (SIGTERM received)" in kept and f"saved step {step}" in kept, kept[-3000:]
    assert "Traceback" not in kept and "Traceback" not in text, (kept + text)[-4000:]
