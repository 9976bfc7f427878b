"""Preemption through the launchers people use (docs/fault-tolerance.md, "Preemption").

A stop signal sent to the `deepspeed` command, to DeepSpeed's `launch.py` or to a rank ends in one
complete checkpoint from every rank, no process left behind, and a resume that ends where an
uninterrupted run does. Each test goes through the real processes: `deepspeed --num_gpus 2` on
2 CPU ranks (gloo), the tiny base64 preset, one DataLoader worker per rank. The shipped SLURM
script is run with stand-ins for `srun` and `scontrol`, and the hostfile example is read by
DeepSpeed's own parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from imagen_train import artifacts
from imagen_train.config import ConfigError, load_config
from imagen_train.training import checkpoint as ckpt
from imagen_train.training import preemption
from imagen_train.training.export import export_checkpoint
from train_helpers import REPO, free_port, tiny_overrides, train_env

pytestmark = pytest.mark.timeout(600)

# Checkpoints only at the end (step MAX_STEPS) unless a stop request writes one; the signal is
# sent once SIGNAL_AFTER steps are logged, well before the end.
MAX_STEPS, SIGNAL_AFTER = 24, 2
EXIT_BOUND_S = 60  # from the signal to the last process gone (the save takes ~1 s here)
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
HOSTFILE = REPO / "launch" / "hostfile.example"


def _sets(run_dir: Path, shards, **extra) -> list[str]:
    return tiny_overrides(run_dir, shards.pattern, shards.embed_dim, max_steps=MAX_STEPS, **{
        "checkpoint.every_steps": 100000, "data.num_workers": 1, "data.shuffle_buffer": 8,
        "training.dist_timeout_s": 60, **extra})


def _train_args(sets: list[str]) -> list[str]:
    args = [str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "base64-tiny.yaml")]
    for item in sets:
        args += ["--set", item]
    return args


def _deepspeed(sets: list[str], port: int = 0) -> list[str]:
    runner = Path(sys.executable).parent / "deepspeed"
    return [sys.executable, str(runner), "--num_gpus", "2", "--master_port", str(port or free_port()),
            *_train_args(sets)]


def _start(cmd: list[str], **env: str) -> subprocess.Popen:
    # Own session: the signals below reach only the process they name, and cleanup is one killpg.
    return subprocess.Popen(cmd, cwd=REPO, env=train_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _drain(proc: subprocess.Popen) -> list[str]:
    """Read the job's output in a thread (a full pipe would block the ranks)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, lines: list[str], steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, "training did not start\n" + "".join(lines)[-4000:]
        time.sleep(0.2)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_all_gone(procs: list[psutil.Process], bound_s: float, log: list[str]) -> None:
    start = time.monotonic()
    deadline = start + bound_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"all {len(procs)} processes gone {time.monotonic() - start:.1f} s after the signal")
    left = [(p.pid, " ".join(p.cmdline()[:4])) for p in _alive(procs)]
    assert not left, f"processes left running {bound_s} s after the signal: {left}\n" + "".join(log)[-4000:]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _cmd(p: psutil.Process) -> str:
    return " ".join(p.cmdline())


def _ranks(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's children (each rank's DataLoader worker is a fork with the same command)."""
    return [p for p in launcher.children() if "launch/train.py" in _cmd(p)]


def _assert_one_complete_checkpoint(root: Path) -> int:
    """Exactly one checkpoint, complete: every rank's files in its verified manifest."""
    tags = ckpt.list_complete(root)
    assert len(tags) == 1, sorted(p.name for p in root.iterdir())
    assert not list(root.glob(ckpt.STAGING_PREFIX + "*"))
    artifacts.verify(root / tags[0])
    files = json.loads((root / tags[0] / "manifest.json").read_text())["files"]
    for r in range(2):  # our state and DeepSpeed's optimizer partition, from each rank
        assert {f"trainer_state_rank{r:05d}.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} <= files.keys()
    step = artifacts.step_of(tags[0])
    assert SIGNAL_AFTER <= step < MAX_STEPS
    return step


def _weights(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(export_checkpoint(folder, out, include_raw=True)))


def _resume_matches(run_dir: Path, shards, straight, tmp_path: Path, step: int) -> None:
    proc = subprocess.run(_deepspeed(_sets(run_dir, shards)), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"at step {step}" in log
    final = run_dir / "checkpoints" / ckpt.tag_for(MAX_STEPS)
    got = _weights(final, tmp_path / "resumed.safetensors")
    assert got.keys() == straight.keys()
    for key in got:
        torch.testing.assert_close(got[key], straight[key], rtol=1e-5, atol=1e-6,
                                   msg=f"{key} differs after a stop at step {step} and a resume")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards_64) -> dict[str, torch.Tensor]:
    """The exported weights of an uninterrupted run to MAX_STEPS."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(_deepspeed(_sets(run_dir, shards_64)), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return _weights(run_dir / "checkpoints" / ckpt.tag_for(MAX_STEPS), run_dir.parent / "w.safetensors")


def test_cpu_run_leaves_no_shared_memory_buffers(tmp_path, shards_64):
    """DeepSpeed's CPU all-reduce makes a ~66 MB /dev/shm buffer per rank (named after the uid,
    master address and port, and rank) and never removes it; the trainer unlinks each once all
    ranks have mapped them. Without that unlink this run leaves two behind."""
    port = free_port()
    proc = subprocess.run(_deepspeed(_sets(tmp_path / "run", shards_64, **{"training.max_steps": 2}), port),
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"shared-memory buffers left behind: {left}"


# Through the launchers ------------------------------------------------------------------------

@pytest.mark.parametrize("target,sig", [("runner", signal.SIGTERM), ("launcher", signal.SIGTERM),
                                        ("rank", signal.SIGINT)])
def test_stop_signal_saves_exits_and_resumes_exactly(tmp_path, shards_64, straight, target, sig):
    """`kill -TERM` of the `deepspeed` command (it forwards nothing and dies: the ranks see their
    launcher gone), of `launch.py` (it terminates each rank's process tree, DataLoader worker
    included, and SIGKILLs after 30 s), or SIGINT to one rank only (the others agree through an
    all-reduce): one complete checkpoint, every process gone, and an exact resume."""
    run_dir = tmp_path / "run"
    job = _start(_deepspeed(_sets(run_dir, shards_64)))
    log = _drain(job)
    try:
        _wait_for_steps(run_dir, job, log, SIGNAL_AFTER)
        tree = _tree(job)
        launcher = [p for p in tree if "deepspeed.launcher.launch" in _cmd(p)]
        assert len(launcher) == 1, [_cmd(p) for p in tree]
        ranks = _ranks(launcher[0])
        assert len(ranks) == 2, [_cmd(p) for p in tree]
        assert all(r.children() for r in ranks), "each rank should have its DataLoader worker"
        victim = {"runner": [tree[0]], "launcher": launcher,
                  "rank": [max(ranks, key=lambda p: "--local_rank=1" in _cmd(p))]}[target]
        for p in victim:
            p.send_signal(sig)
        _wait_all_gone(tree, EXIT_BOUND_S, log)
        job.wait(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = "".join(log)
    assert "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    assert "[train] stop requested (" in text, text[-4000:]
    # The runner dies of the signal; launch.py exits 1 after it was signalled (its code, not ours).
    assert job.returncode == {"runner": -sig, "launcher": 1, "rank": 0}[target], text[-4000:]
    if target == "runner":
        assert "[train] stop requested (launcher deepspeed (pid" in text
    step = _assert_one_complete_checkpoint(run_dir / "checkpoints")
    _resume_matches(run_dir, shards_64, straight, tmp_path, step)


# SLURM and the hostfile ----------------------------------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun: runs SLURM_NTASKS local tasks with srun's task variables, forwards the
# signals srun forwards, and exits non-zero if a task failed. It records its own arguments.
echo "$*" > "$FAKE_SLURM_LOG/srun.args"
while [[ "$1" == --* ]]; do
  if [[ "$1" == --export=ALL,* ]]; then
    IFS=, read -ra pairs <<< "${1#--export=ALL,}"
    for pair in "${pairs[@]}"; do export "${pair?}"; done
  fi
  shift
done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
forward() { echo "srun $1" >> "$FAKE_SLURM_LOG/signals"; kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [[ $status -ne 0 ]] && rc=$status
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol"
if [[ "$1 $2" == "show hostnames" ]]; then echo node-001; echo node-002; fi
"""


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log_dir),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[001-002]", "SLURM_NTASKS": "2",
            "SLURM_NNODES": "1", "SLURM_SUBMIT_DIR": str(REPO), "IMAGEN_TRAIN_PYTHON": sys.executable}


def test_sbatch_script_parses_and_dry_run_builds_the_command(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = {**os.environ, **_fake_slurm(tmp_path), "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(SBATCH), "configs/sr256-400m.yaml", "--set", "optim.lr=3e-5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "srun" in out and "--kill-on-bad-exit=1" in out
    assert "MASTER_ADDR=node-001" in out and "MASTER_PORT=" in out
    assert "launch/train.py --config configs/sr256-400m.yaml --set optim.lr=3e-5" in out
    assert not (tmp_path / "slurm-log" / "srun.args").exists()  # a dry run starts nothing
    # The directives ask for the advance warning the script traps.
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in directives


def test_sbatch_advance_warning_saves_and_requeues(tmp_path, shards_64):
    """SLURM's `--signal=B:USR1@300` reaches the batch shell only: the script forwards it to srun
    (which forwards it to every task), every rank saves the same step and exits 0, and the
    script requeues the job."""
    run_dir = tmp_path / "run"
    env = _fake_slurm(tmp_path)
    sets = _sets(run_dir, shards_64, **{"data.num_workers": 0})
    cmd = ["bash", str(SBATCH), str(REPO / "configs" / "base64-tiny.yaml")]
    for item in sets:
        cmd += ["--set", item]
    job = _start(cmd, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    log = _drain(job)
    try:
        _wait_for_steps(run_dir, job, log, SIGNAL_AFTER)
        tree = _tree(job)
        job.send_signal(signal.SIGUSR1)  # the batch shell, as SLURM's B: prefix does
        _wait_all_gone(tree, EXIT_BOUND_S, log)
        job.wait(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = "".join(log)
    assert job.returncode == 0, text[-4000:]
    assert "[train] stop requested (SIGUSR1 received)" in text
    assert (tmp_path / "slurm-log" / "signals").read_text().split("\n")[0] == "srun USR1"
    assert "requeue 4242" in (tmp_path / "slurm-log" / "scontrol").read_text()
    _assert_one_complete_checkpoint(run_dir / "checkpoints")


def test_hostfile_example_parses_and_builds_a_launch():
    """DeepSpeed reads the example hostfile, and its PDSH runner builds a launch of our script."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import encode_world_info, fetch_hostfile, parse_args, parse_inclusion_exclusion

    pool = fetch_hostfile(str(HOSTFILE))
    assert pool and all(slots >= 1 for slots in pool.values())
    args = parse_args(["--hostfile", str(HOSTFILE), "--master_addr", next(iter(pool)),
                       *_train_args(["training.max_steps=10"])])
    active = parse_inclusion_exclusion(pool, args.include, args.exclude)
    runner = PDSHRunner(args, encode_world_info(active))
    cmd, kill_cmd, _ = runner.get_cmd(dict(os.environ), active)
    text = " ".join(cmd)
    assert ",".join(pool) in text and "deepspeed.launcher.launch" in text
    assert "launch/train.py" in text and "training.max_steps=10" in text
    assert "pkill" in " ".join(kill_cmd)  # how the runner stops the remote launchers


# Units -----------------------------------------------------------------------------------------

def test_stop_signals_key_is_validated():
    cfg = load_config(REPO / "configs" / "base64-tiny.yaml", ["training.stop_signals=[SIGUSR2]"])
    assert cfg.training.stop_signals == ["SIGUSR2"]
    for bad in ("[SIGKILL]", "[SIGNOPE]", "[15]"):
        with pytest.raises(ConfigError, match="training.stop_signals"):
            load_config(REPO / "configs" / "base64-tiny.yaml", [f"training.stop_signals={bad}"])


def test_launcher_names_from_command_lines():
    py = sys.executable
    assert preemption.launcher_name([py, "/v/bin/deepspeed", "--num_gpus", "2", "t.py"]) == "deepspeed"
    assert preemption.launcher_name([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="]) \
        == "deepspeed.launcher.launch"
    assert preemption.launcher_name([py, "/v/bin/torchrun", "--nproc_per_node=2", "t.py"]) == "torchrun"
    assert preemption.launcher_name([py, "-m", "torch.distributed.run", "t.py"]) == "torch.distributed.run"
    assert preemption.launcher_name([py, "-u", "launch/train.py", "--local_rank=0"]) is None
    assert preemption.launcher_name(["bash", "-c", "echo deepspeed.launcher.launch"]) is None
    assert preemption.launcher_ancestors() == []  # pytest is no launcher


def test_stop_request_catches_signals_and_restores(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    with preemption.StopRequest(["SIGUSR2"]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a second signal is noted, never fatal
        assert stop.requested and stop.reason == "SIGUSR2 received"
    assert signal.getsignal(signal.SIGUSR2) is before


def test_launcher_death_is_a_stop_request(tmp_path):
    """A process under a stand-in launcher (a script named `torchrun`) asks to stop when the
    launcher is SIGKILLed, and is re-parented without being signalled."""
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from imagen_train.training.preemption import StopRequest
        stop = StopRequest([], poll_s=0.1).install()
        print("watching", [name for _, name in stop.launchers], flush=True)
        deadline = time.monotonic() + 30
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        print("stop:", stop.reason, flush=True)
    """)
    (tmp_path / "child.py").write_text(child)
    out = tmp_path / "out.txt"
    launcher = tmp_path / "torchrun"
    launcher.write_text(f"import subprocess, sys, time\n"
                        f"subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}], "
                        f"stdout=open({str(out)!r}, 'w'))\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(launcher)])
    try:
        deadline = time.monotonic() + 30
        while "watching" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "watching ['torchrun']" in out.read_text()
        proc.kill()
        proc.wait()
        while "stop:" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"stop: launcher torchrun (pid {proc.pid}) exited" in out.read_text()
    finally:
        proc.kill()


WORKER_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from imagen_train.utils.signals import worker_init

    class Pids(IterableDataset):
        def __iter__(self):
            while True:
                yield os.getpid()

    it = iter(DataLoader(Pids(), batch_size=None, num_workers=1, worker_init_fn=worker_init(["SIGUSR1"])))
    worker = next(it)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.kill(worker, sig)
    time.sleep(0.5)
    assert next(it) == worker  # the same worker still serves
    print("worker", worker, flush=True)
    # Exit without closing the loader: multiprocessing's exit hook would wait for ever on a
    # worker that ignores SIGTERM; ours kills it.
""")


def test_dataloader_workers_ignore_stop_signals_and_end_with_the_rank(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = int(proc.stdout.split()[1])
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_save_time_fit_separates_fixed_cost_and_rate():
    """bench/checkpoint_save.py's fit, behind the time-budget table of docs/fault-tolerance.md."""
    sys.path.insert(0, str(REPO / "bench"))
    import checkpoint_save

    rows = [{"bytes": b, "median_s": 0.5 + b / 100e6} for b in (1e6, 50e6, 400e6)]
    fixed, rate = checkpoint_save.fit(rows)
    assert fixed == pytest.approx(0.5) and rate == pytest.approx(100e6)
    assert checkpoint_save.fit(rows[:1]) == (0.0, pytest.approx(1e6 / rows[0]["median_s"]))
