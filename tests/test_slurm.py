"""The shipped SLURM script, `launch/slurm/train.sbatch`, on a real SLURM cluster.

Two `slurmd` daemons on this machine pose as 2 nodes (tests/cluster/slurm.sh); every job goes
through `sbatch` and the shipped script, 2 nodes x 1 rank, the tiny base64 preset on CPU ranks.
What SLURM does here is SLURM's own: srun's signal forwarding, `scancel` and its KillWait
SIGKILL, the time limit and its `--signal=B:USR1@N` warning, `scontrol requeue`.

The one thing the tests change is the wait of a requeued job: SLURM holds it about 2 minutes
(its BeginTime, the credential lifetime `cred_expire`) before it may start again; the tests
release it with `scontrol update JobId=N StartTime=now`, as an administrator may, 2 s after the
requeue: a node refuses a batch launch whose credential is not newer, to the second, than the
requeue's revocation of the old one ("Job credential revoked").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster_helpers import missing_or_skip, slurm_service, wait_none_left
from imagen_train import artifacts
from imagen_train.training import checkpoint as ckpt
from imagen_train.artifacts import export_checkpoint
from train_helpers import REPO, free_port, read_metrics, run_training, tiny_overrides, train_env

pytestmark = pytest.mark.timeout(600)

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
STOP_PHASES = REPO / "tests" / "hooks"  # test-only hooks the ranks load (hook_phases.py)
MAX_STEPS = 12
KILL_WAIT_S = 30  # tests/cluster/slurm.sh: SLURM SIGKILLs what is left this long after SIGTERM
GONE_BOUND_S = 25  # our processes must end on their own, before SLURM's SIGKILL could
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def slurm():
    yield from slurm_service()


def _sets(run_dir: Path, shards) -> list[str]:
    return tiny_overrides(run_dir, shards.pattern, shards.embed_dim, max_steps=MAX_STEPS, **{
        "checkpoint.every_steps": 100000, "data.num_workers": 1, "data.shuffle_buffer": 8})


def _weights(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(export_checkpoint(folder, out, include_raw=True)))


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, shards_64) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same recipe on one node (torchrun, 2 ranks): its losses and final weights."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    run_training("base64-tiny.yaml", _sets(run_dir, shards_64))
    losses = [m["train/loss"] for m in read_metrics(run_dir)]
    assert len(losses) == MAX_STEPS
    return losses, _weights(run_dir / "checkpoints" / ckpt.tag_for(MAX_STEPS), run_dir.parent / "w.safetensors")


def _sbatch(slurm: dict, run_dir: Path, sets: list[str], *options: str, **env: str) -> int:
    """Submit the shipped script for 2 nodes x 1 CPU rank; returns the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
           f"--output={run_dir.parent / 'slurm-%j.out'}", "--job-name=imagen-test", *options,
           str(SBATCH), str(REPO / "configs" / "base64-tiny.yaml")]
    for item in sets:
        cmd += ["--set", item]
    # sbatch passes this environment on to the job (--export=ALL).
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=train_env(
        **slurm, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), IMAGEN_TRAIN_PYTHON=sys.executable, **env))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def _slurm(slurm: dict, *args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env={**os.environ, **slurm})
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _job(slurm: dict, job: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ...)."""
    fields = _slurm(slurm, "scontrol", "show", "job", "-o", str(job)).split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _output(run_dir: Path, job: int) -> str:
    path = run_dir.parent / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def _wait_job(slurm: dict, job: int, run_dir: Path, until, what: str, timeout_s: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _job(slurm, job)
        if until(info):
            return info
        assert info["JobState"] not in FINAL, f"job {job} is {info['JobState']}, never {what}\n" \
                                              f"{_output(run_dir, job)[-4000:]}"
        assert time.monotonic() < deadline, f"job {job} never {what}: {info.get('JobState')} " \
                                            f"{info.get('Reason')}\n{_output(run_dir, job)[-4000:]}"
        time.sleep(0.3)


def _wait_file(path: Path, slurm: dict, job: int, run_dir: Path, lines: int = 1, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        state = _job(slurm, job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}\n{_output(run_dir, job)[-4000:]}"
        assert time.monotonic() < deadline, f"no {path}\n{_output(run_dir, job)[-4000:]}"
        time.sleep(0.3)


def _release(slurm: dict, job: int, *updates: str) -> None:
    """Start a requeued job now rather than after its BeginTime (see the module doc)."""
    time.sleep(2)  # a credential of a later second than the requeue's revocation
    _slurm(slurm, "scontrol", "update", f"JobId={job}", *updates, "StartTime=now")


def _requeued(restarts: int):
    return lambda info: info["JobState"] == "PENDING" and int(info["Restarts"]) >= restarts


def _gone(job: int, run_dir: Path, bound_s: float = GONE_BOUND_S) -> None:
    """No task, srun, batch shell or slurmstepd of the job left (each names the run folder or `[job.`)."""
    wait_none_left([str(run_dir), f"[{job}."], bound_s, _output(run_dir, job))


def _complete(root: Path) -> list[int]:
    for tag in ckpt.list_complete(root):
        artifacts.verify(root / tag)  # every rank's files, sizes and checksums
    assert not list(root.glob(ckpt.STAGING_PREFIX + "*"))
    return [artifacts.step_of(tag) for tag in ckpt.list_complete(root)]


@pytest.mark.multirank
def test_sbatch_job_trains_like_one_node_and_scancel_saves(slurm, one_node, tmp_path, shards_64):
    """2 nodes x 1 rank under sbatch log the losses of the single-node 2-rank run, step for
    step; `scancel` (SIGTERM to the batch shell, srun and every task; SIGKILL after KillWait)
    ends in one complete checkpoint, every process gone before KillWait."""
    run_dir = tmp_path / "run"
    job = _sbatch(slurm, run_dir, _sets(run_dir, shards_64))
    _wait_file(run_dir / "metrics.jsonl", slurm, job, run_dir, lines=3)
    _slurm(slurm, "scancel", str(job))
    start = time.monotonic()
    _gone(job, run_dir)
    print(f"job {job}: every process gone {time.monotonic() - start:.1f} s after scancel")
    text = _output(run_dir, job)
    assert "[train] stop requested (SIGTERM received)" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    (step,) = _complete(run_dir / "checkpoints")
    losses = [m["train/loss"] for m in read_metrics(run_dir)]
    assert 3 <= step == len(losses) < MAX_STEPS
    assert losses == one_node[0][:step]  # bit for bit: the same ranks, data and arithmetic


@pytest.mark.multirank
def test_usr1_warning_saves_requeues_and_resumes_exactly(slurm, one_node, tmp_path, shards_64):
    """The advance warning, both ways, each ending in a save, a requeue and an exact resume:
    1. a real time limit: `--time=2 --signal=B:USR1@60` (slurmctld sends it 60-90 s before the
       limit: it checks every 30 s and sends it early rather than late); the test sends nothing;
    2. `scancel --signal=USR1 --batch` (the time limit is lifted first, so only this can stop it);
    3. the last start trains to the end. Losses and final weights equal the single-node run's.
    Each start is held (tests/hooks, `step`) after its first step until it is told to stop,
    so that it stops at a known step."""
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    (markers / "hold").touch()
    job = _sbatch(slurm, run_dir, _sets(run_dir, shards_64), "--time=2", "--signal=B:USR1@60",
                  IMAGEN_TRAIN_TEST_PAUSE="step", IMAGEN_TRAIN_TEST_MARKERS=str(markers),
                  PYTHONPATH=os.pathsep.join([str(STOP_PHASES), str(REPO)]))
    root = run_dir / "checkpoints"

    # 1. The time limit's warning; a start-up slower than 30 s may take it before the first step
    # (then nothing is saved and the job comes back as well): try again, at most twice more.
    for attempt in range(3):
        info = _wait_job(slurm, job, run_dir, _requeued(attempt + 1), "requeued after the time-limit warning")
        if root.exists() and ckpt.list_complete(root):
            break
        assert "stop before the first step" in _output(run_dir, job)
        for stale in markers.glob("stop-rank*"):
            stale.unlink()
        _release(slurm, job)
    assert _complete(root) == [1], _output(run_dir, job)[-4000:]
    assert "[sbatch] SIGUSR1 received" in _output(run_dir, job)
    _gone(job, run_dir)

    # 2. scancel --signal=USR1 --batch, with no time limit left.
    restarts = int(info["Restarts"])
    held = len((markers / "step-rank0").read_text().splitlines())
    for stale in markers.glob("stop-rank*"):
        stale.unlink()
    _release(slurm, job, "TimeLimit=UNLIMITED")
    _wait_file(markers / "step-rank0", slurm, job, run_dir, lines=held + 1)
    _slurm(slurm, "scancel", "--signal=USR1", "--batch", str(job))
    _wait_job(slurm, job, run_dir, _requeued(restarts + 1), "requeued after scancel --signal=USR1 --batch")
    assert _complete(root) == [1, 2], _output(run_dir, job)[-4000:]
    _gone(job, run_dir)

    # 3. To the end.
    (markers / "hold").unlink()
    _release(slurm, job)
    info = _wait_job(slurm, job, run_dir, lambda i: i["JobState"] in FINAL, "finished")
    text = _output(run_dir, job)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    _gone(job, run_dir)
    for step in (1, 2):
        assert f"resumed from {root / ckpt.tag_for(step)} at step {step}" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert [m["train/loss"] for m in read_metrics(run_dir)] == one_node[0]
    got = _weights(root / ckpt.tag_for(MAX_STEPS), tmp_path / "w.safetensors")
    assert got.keys() == one_node[1].keys()
    for key in got:
        assert torch.equal(got[key], one_node[1][key]), f"{key} differs after two requeues"


@pytest.mark.multirank
@pytest.mark.parametrize("how", ["scancel", "usr1"])
def test_signal_during_startup_leaves_nothing_running(slurm, tmp_path, shards_64, how):
    """Both ranks held while importing torch (tests/hooks), then `scancel` (SIGTERM to
    everything) or the time-limit warning (`scancel --signal=USR1 --batch`): every process ends
    at once with nothing saved; after the warning the job is requeued (it saved nothing, and it
    comes back to train)."""
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    job = _sbatch(slurm, run_dir, _sets(run_dir, shards_64), IMAGEN_TRAIN_TEST_PAUSE="import",
                  IMAGEN_TRAIN_TEST_MARKERS=str(markers), PYTHONPATH=os.pathsep.join([str(STOP_PHASES), str(REPO)]))
    try:
        _wait_file(markers / "import-rank1", slurm, job, run_dir)
        _wait_file(markers / "import-rank0", slurm, job, run_dir)
        if how == "scancel":
            _slurm(slurm, "scancel", str(job))
        else:
            _slurm(slurm, "scancel", "--signal=USR1", "--batch", str(job))
        start = time.monotonic()
        _gone(job, run_dir)
        print(f"job {job}: every process gone {time.monotonic() - start:.1f} s after the signal")
        text = _output(run_dir, job)
        assert "stop before the first step (" in text and "nothing to save" in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        assert not (run_dir / "metrics.jsonl").exists()
        assert not (run_dir / "checkpoints").exists() or not ckpt.list_complete(run_dir / "checkpoints")
        if how == "usr1":
            _wait_job(slurm, job, run_dir, _requeued(1), "requeued after a warning in start-up", timeout_s=60)
    finally:
        subprocess.run(["scancel", str(job)], env={**os.environ, **slurm}, capture_output=True)


def test_missing_daemons_skip_with_how_to_and_fail_in_ci(monkeypatch):
    """Without the packages the launcher tests skip with one line naming what to install; with
    IMAGEN_TRAIN_REQUIRE_CLUSTER=1 (.ci/run) the same is a failure."""
    needs = {"slurmctld": "no-such-slurmctld-binary"}
    monkeypatch.delenv("IMAGEN_TRAIN_REQUIRE_CLUSTER", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        missing_or_skip("SLURM", needs, "slurmctld slurmd slurm-client munge")
    assert "apt-get install -y slurmctld slurmd slurm-client munge" in str(skipped.value)
    assert "\n" not in str(skipped.value)
    monkeypatch.setenv("IMAGEN_TRAIN_REQUIRE_CLUSTER", "1")
    with pytest.raises(pytest.fail.Exception, match="CI never skips them"):
        missing_or_skip("SLURM", needs, "slurmctld slurmd slurm-client munge")
