"""Preemption through the launchers people use (docs/fault-tolerance.md, "Preemption").

A stop signal sent to the `deepspeed` command, to DeepSpeed's `launch.py` or to a rank ends in one
complete checkpoint from every rank, no process left behind, and a resume that ends where an
uninterrupted run does; a stop before the first step ends every process at once. Each test goes
through the real processes: `deepspeed --num_gpus 2` on 2 CPU ranks (gloo), the tiny base64
preset, one DataLoader worker per rank. The start-up and loop phases where a stop may land are
reached on purpose by tests/hooks (hook_phases.py). The shipped SLURM script's dry run is
checked here (tests/test_slurm.py runs it on a real cluster), and the hostfile example is read
by DeepSpeed's own parser (tests/test_hostfile.py runs a hostfile launch over ssh).
"""

from __future__ import annotations

import json
import os
import re
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
from imagen_train.artifacts import export_checkpoint
from train_helpers import REPO, free_port, read_metrics, tiny_overrides, train_env

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
def straight_run(tmp_path_factory, shards_64) -> tuple[dict[str, torch.Tensor], int, str]:
    """An uninterrupted run to MAX_STEPS: its exported weights, its master port and its output."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    port = free_port()
    proc = subprocess.run(_deepspeed(_sets(run_dir, shards_64), port), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return (_weights(run_dir / "checkpoints" / ckpt.tag_for(MAX_STEPS), run_dir.parent / "w.safetensors"), port,
            proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def straight(straight_run) -> dict[str, torch.Tensor]:
    """The exported weights of an uninterrupted run to MAX_STEPS."""
    return straight_run[0]


@pytest.mark.multirank
def test_cpu_run_builds_no_shared_memory_op_and_leaves_no_buffers(straight_run):
    """DeepSpeed's CPU backend builds a shared-memory all-reduce op (a C++ compile on a machine's
    first run) that maps a ~66 MB /dev/shm buffer per rank, named after the uid, master address
    and port, and rank, and never removes it. Training never calls that op, so the ranks skip it
    (deepspeed_internals.skip_shm_comm_op): no build, no buffer left behind."""
    _, port, log = straight_run
    assert "shm_comm_op built" not in log, log[-2000:]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"shared-memory buffers left behind: {left}"


# Through the launchers ------------------------------------------------------------------------

@pytest.mark.multirank
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
    if target == "runner":  # from rank 0, or from the rank whose watcher saw it first
        assert re.search(r"\[train\] (rank \d+: )?stop requested \(launcher deepspeed \(pid", text), text[-4000:]
    step = _assert_one_complete_checkpoint(run_dir / "checkpoints")
    _resume_matches(run_dir, shards_64, straight, tmp_path, step)


# A stop at any moment: each phase reached on purpose --------------------------------------------
# tests/hooks/hook_phases.py holds a rank at a named phase (PYTHONPATH, from the test side: the
# production code has no hook for it) and writes a marker file; the signal goes in then.

START_EXIT_BOUND_S = 20  # before the first step: from the signal to the last process gone


def _phase_env(markers: Path, pause: str) -> dict[str, str]:
    markers.mkdir()  # train_env puts tests/hooks on the ranks' PYTHONPATH for these variables
    return {"IMAGEN_TRAIN_TEST_PAUSE": pause, "IMAGEN_TRAIN_TEST_MARKERS": str(markers)}


def _wait_for_markers(markers: Path, names: list[str], proc: subprocess.Popen, lines: list[str]) -> None:
    deadline = time.monotonic() + 300
    while not all((markers / name).exists() for name in names):
        assert proc.poll() is None, "".join(lines)[-4000:]
        assert time.monotonic() < deadline, f"no {names} in {markers}\n" + "".join(lines)[-4000:]
        time.sleep(0.1)


def _rank(tree: list[psutil.Process], local_rank: int) -> psutil.Process:
    return next(p for p in tree if f"--local_rank={local_rank}" in _cmd(p) and "launch/train.py" in _cmd(p)
                and p.parent() and "deepspeed.launcher.launch" in _cmd(p.parent()))


@pytest.mark.multirank
@pytest.mark.parametrize("phase,target", [("import", "runner"), ("build", "rank1")])
def test_stop_before_the_first_step_exits_at_once(tmp_path, shards_64, phase, target):
    """A stop during start-up ends every process within seconds, with nothing saved. `import`:
    both ranks held while importing torch, and SIGTERM to the `deepspeed` command (the ranks see
    it gone); `build`: rank 0 held in DeepSpeed's build of its CPU comm op while rank 1 waits in
    the rendezvous (in C++, where no Python signal handler runs), and SIGTERM to rank 1 only
    (its launcher then stops rank 0): the case that once left `launch.py` and a rank running."""
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    pause, waits = {"import": ("import", ["import-rank0", "import-rank1"]),
                    "build": ("build@0", ["build-rank0", "rendezvous-rank1"])}[phase]
    job = _start(_deepspeed(_sets(run_dir, shards_64)), **_phase_env(markers, pause))
    log = _drain(job)
    try:
        _wait_for_markers(markers, waits, job, log)
        time.sleep(1.0)  # rank 1 well inside init_process_group
        tree = _tree(job)
        (tree[0] if target == "runner" else _rank(tree, 1)).send_signal(signal.SIGTERM)
        _wait_all_gone(tree, START_EXIT_BOUND_S, log)
        job.wait(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = "".join(log)
    assert "stop before the first step (" in text and "nothing to save" in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    # The runner dies of the signal; otherwise launch.py passes the rank's code on.
    assert job.returncode == {"runner": -signal.SIGTERM, "rank1": preemption.STOPPED_BEFORE_START}[target]
    assert not (run_dir / "metrics.jsonl").exists()  # no step ran
    assert not (run_dir / "checkpoints").exists() or not ckpt.list_complete(run_dir / "checkpoints")


LOOP_PHASES = {
    # phase: (pause, marker, signal target, signal, extra settings, extra environment)
    "eval": ("eval@0", "eval-rank0", "launcher", signal.SIGTERM, {
        "evaluation.eval_every_steps": 2, "evaluation.batch_size": 1, "evaluation.sampler.steps": 2}, {}),
    "save": ("save@1", "save-rank1", "rank", signal.SIGINT, {"checkpoint.every_steps": 2}, {}),
    "nan": ("nan@0", "nan-rank0", "runner", signal.SIGTERM, {}, {"IMAGEN_TRAIN_FAULT_NAN_STEPS": "3"}),
}


@pytest.mark.multirank
@pytest.mark.parametrize("phase", list(LOOP_PHASES))
def test_stop_in_the_loop_is_honoured_where_it_lands(tmp_path, shards_64, phase):
    """`eval`: a stop during an evaluation (4 grid samples, 1 per batch: 2 batches per rank)
    ends it after the batch in progress; `save`: a stop during the step-2 save exits right after
    it, with no second save; `nan`: a stop at an update skipped for a NaN loss (step 3) saves
    step 2 and exits, instead of redoing step 3. Each: one complete checkpoint of step 2, every
    process gone."""
    pause, marker, target, sig, extra, env = LOOP_PHASES[phase]
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    if phase == "eval":
        extra = {**extra, "data.eval_shards": shards_64.pattern}
    job = _start(_deepspeed(_sets(run_dir, shards_64, **extra)), **_phase_env(markers, pause), **env)
    log = _drain(job)
    try:
        _wait_for_markers(markers, [marker], job, log)
        tree = _tree(job)
        victim = {"runner": tree[0], "rank": _rank(tree, 1),
                  "launcher": next(p for p in tree if "deepspeed.launcher.launch" in _cmd(p))}[target]
        victim.send_signal(sig)
        _wait_all_gone(tree, EXIT_BOUND_S, log)
        job.wait(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = "".join(log)
    assert "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    assert _assert_one_complete_checkpoint(run_dir / "checkpoints") == 2, text[-4000:]
    assert text.count("[train] checkpoint ") == 1, text[-4000:]
    assert "saved step 2 and exiting" in text, text[-4000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    if phase == "eval":  # one sampling batch per rank, of two
        assert "[eval] step 2: a stop was requested after 1 sampling batches" in text, text[-4000:]
        for r in range(2):
            assert len((markers / f"calls-eval-rank{r}").read_text().splitlines()) == 1
    if phase == "nan":
        assert "non-finite loss at step 3" in text, text[-4000:]


# SLURM and the hostfile ----------------------------------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
echo "$*" > "$FAKE_SLURM_LOG/srun.args"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol"
if [[ "$1 $2" == "show hostnames" ]]; then echo node-001; echo node-002; fi
"""


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """What the batch shell sees inside an allocation, with stand-ins for `scontrol` and `srun`."""
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
    """The dry run prints the srun command inside an allocation (the first node as
    MASTER_ADDR), and outside one as documented, with a placeholder; without DRY_RUN, outside an
    allocation, it refuses. tests/test_slurm.py runs the script on a real SLURM cluster."""
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = {**os.environ, **_fake_slurm(tmp_path), "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(SBATCH), "configs/sr256-400m.yaml", "--set", "optim.lr=3e-5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "srun" in out and "--kill-on-bad-exit=1" in out
    assert "MASTER_ADDR=node-001" in out and "MASTER_PORT=29742" in out  # 29500 + job id % 1000
    assert "launch/train.py --config configs/sr256-400m.yaml --set optim.lr=3e-5" in out
    assert not (tmp_path / "slurm-log" / "srun.args").exists()  # a dry run starts nothing
    # Outside an allocation (no SLURM_* variables at all), as docs/fault-tolerance.md shows it.
    bare = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH), "configs/sr256-400m.yaml"], cwd=REPO,
                          env={**bare, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "MASTER_ADDR=FIRST_NODE" in proc.stdout and "launch/train.py --config configs/sr256-400m.yaml" in proc.stdout
    assert "placeholder" in proc.stderr
    proc = subprocess.run(["bash", str(SBATCH), "configs/sr256-400m.yaml"], cwd=REPO, env=bare,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr
    # The directives ask for the advance warning the script traps, with the documented lead.
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --signal=B:USR1@{_documented_lead_s()}" in directives


def _documented_lead_s() -> int:
    """The lead that follows from docs/fault-tolerance.md's save-time table (its slowest node
    save, by bench/checkpoint_save.py's rule); the doc states the same number."""
    sys.path.insert(0, str(REPO / "bench"))
    import checkpoint_save

    doc = (REPO / "docs" / "fault-tolerance.md").read_text().splitlines()
    header = next(i for i, line in enumerate(doc) if "| the node through one disk |" in line)
    column = [c.strip() for c in doc[header].split("|")].index("the node through one disk")
    seconds = []
    for line in doc[header + 2:]:
        if not line.startswith("|"):
            break
        seconds.append(float(line.split("|")[column].strip().lstrip("~").split()[0]))
    assert len(seconds) == 4, seconds  # the four full presets
    lead = checkpoint_save.usr1_lead_s(max(seconds))
    assert f"within the warning's lead ({lead} s)" in doc[header]
    return lead


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


EXIT_BEFORE_START = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from imagen_train.training.preemption import StopRequest
    stop = StopRequest(["SIGUSR1"], exit_before_start=6, poll_s=0.1).install()
    if sys.argv[2] == "started":
        stop.started()
    # As torch builds an op at run time: the build folder's lock held, `ninja` running in it.
    build = sys.argv[3]
    open(os.path.join(build, "lock"), "w").close()
    ninja = subprocess.Popen([os.path.join(build, "ninja")], cwd=build, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.3)
    print(ninja.pid, flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.5)
    print("requested", stop.requested, stop.reason, flush=True)
    os.killpg(ninja.pid, signal.SIGKILL)
""")


@pytest.mark.parametrize("when", ["starting", "started"])
def test_stop_before_start_exits_with_children_and_after_start_only_asks(tmp_path, when):
    """With `exit_before_start`, a stop signal before `started()` ends the process at once with
    that code, its children SIGKILLed (a run-time op build's `ninja` among them, whose build
    folder lock is removed, or every later run would wait on it); after `started()` the same
    signal only sets the request."""
    script, build = tmp_path / "stop.py", tmp_path / "build"
    script.write_text(EXIT_BEFORE_START)
    build.mkdir()
    (build / "ninja").write_text("#!/bin/sh\nsleep 60\n")
    (build / "ninja").chmod(0o755)
    proc = subprocess.run([sys.executable, str(script), str(REPO), when, str(build)], capture_output=True,
                          text=True, timeout=60)
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    if when == "starting":
        assert proc.returncode == 6, proc.stderr
        assert "stop before the first step (SIGUSR1 received): nothing to save" in proc.stderr
        assert "requested" not in proc.stdout
        assert not (build / "lock").exists()  # the killed build's lock is given back
    else:
        assert proc.returncode == 0, proc.stderr
        assert "requested True SIGUSR1 received" in proc.stdout
        assert (build / "lock").exists()


CLOSED_OUTPUT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from imagen_train.utils.signals import survive_closed_output
    survive_closed_output(lambda: sys.argv[2])
    sys.stdin.readline()  # the reader has closed our stdout by now
    for i in range(3):
        print("line", i, flush=True)
    print("to stderr", file=sys.stderr, flush=True)
""")


def test_output_survives_a_closed_reader(tmp_path):
    """A rank whose stdout reader is gone (ssh closed) keeps running; what it prints goes to the
    fallback file. Without the wrapper the first print raises BrokenPipeError."""
    script, fallback = tmp_path / "out.py", tmp_path / "logs" / "rank0.log"
    script.write_text(CLOSED_OUTPUT)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(fallback)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert "line 0" in fallback.read_text() and "line 2" in fallback.read_text()
    assert "to stderr" in proc.stderr.read()  # stderr's reader was still there: left alone


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
                yield os.getpid(), time.monotonic()  # who made the item, and when

    it = iter(DataLoader(Pids(), batch_size=None, num_workers=1, worker_init_fn=worker_init(["SIGUSR1"])))
    worker, _ = next(it)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.kill(worker, sig)
    sent = time.monotonic()
    # The loader prefetches: items made before the signals prove nothing. Take items until one
    # made after them (a dead worker makes none: the loader raises that it exited).
    for _ in range(100):
        pid, made = next(it)
        if made > sent:
            break
    assert made > sent and pid == worker  # the same worker, alive, still serves
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
    # The advance warning: twice the slowest node save, in whole minutes.
    assert [checkpoint_save.usr1_lead_s(s) for s in (10, 30, 123, 150, 151)] == [60, 60, 300, 300, 360]
