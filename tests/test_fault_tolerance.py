"""Fault tolerance: each promise of docs/fault-tolerance.md shown by injecting its fault.

2 CPU ranks, the tiny base64 preset, fp32. The faults come from tests/hooks/hook_faults.py
(IMAGEN_TRAIN_FAULT_* variables: the ranks' engine wrapped from the test side; the production
code has no fault hook) or are made here (corrupt files, full disks, failing `pipe:` commands,
hostile shard members).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imagen_train import artifacts
from imagen_train.artifacts import ema_state_dict
from imagen_train.artifacts.checkpoints import verify
from imagen_train.config import ConfigError, load_config
from imagen_train.data import build_train_loader, iter_raw_samples
from imagen_train.training import checkpoint as ckpt
from imagen_train.artifacts import export_checkpoint
from train_helpers import REPO, launch_command, read_metrics, run_training, tiny_overrides, train_env

pytestmark = pytest.mark.timeout(600)

MAX_STEPS, EVERY = 12, 4
# A dead rank must bring the job down well within this (torchrun notices the death, the
# survivor's collective fails on the closed connection or times out after dist_timeout_s).
DIST_TIMEOUT_S = 30
EXIT_BOUND_S = 90


def _sets(run_dir: Path, shards, **extra) -> list[str]:
    return tiny_overrides(run_dir, shards.pattern, shards.embed_dim, max_steps=MAX_STEPS, **{
        "checkpoint.every_steps": EVERY, "data.shuffle_buffer": 8,
        "training.dist_timeout_s": DIST_TIMEOUT_S, **extra})


def _launch(sets: list[str], timeout: int = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(launch_command("base64-tiny.yaml", sets), cwd=REPO, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _weights(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(export_checkpoint(folder, out, include_raw=True)))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs: {what}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards_64):
    """An uninterrupted run: checkpoints at steps 4, 8, 12, and its exported weights."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_training("base64-tiny.yaml", _sets(run_dir, shards_64))
    root = run_dir / "checkpoints"
    assert ckpt.list_complete(root) == [ckpt.tag_for(s) for s in (4, 8, 12)]
    return run_dir, _weights(root / ckpt.tag_for(MAX_STEPS), run_dir.parent / "final.safetensors")


# kill -9 ------------------------------------------------------------------------------------

@pytest.mark.multirank
@pytest.mark.parametrize("where", ["save", "step"])
def test_kill9_exits_bounded_and_resumes_exactly(tmp_path, shards_64, straight, where):
    """SIGKILL of one rank (mid-checkpoint or mid-training): the job ends with an error in
    bounded time, the previous checkpoint stays, and `--resume auto` ends bit-for-bit where the
    uninterrupted run did."""
    rng = random.Random(os.getpid())
    if where == "save":  # the step-8 checkpoint is being written: step 4 must be used
        fault, killed_at, expected = "IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS", 8, 4
    else:  # a random step that is not a checkpoint step
        killed_at = rng.choice([s for s in range(5, MAX_STEPS) if s % EVERY])
        fault, expected = "IMAGEN_TRAIN_FAULT_KILL_STEPS", killed_at // EVERY * EVERY
    victim = rng.randrange(2)
    run_dir = tmp_path / "run"
    proc, elapsed = _launch(_sets(run_dir, shards_64), **{fault: f"{killed_at}@{victim}"})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert f"SIGKILL rank {victim} at step {killed_at}" in log
    assert elapsed < EXIT_BOUND_S, f"the job took {elapsed:.0f} s to end after a rank died"
    root = run_dir / "checkpoints"
    assert artifacts.find_resume_tag(root) == ckpt.tag_for(expected), sorted(p.name for p in root.iterdir())
    assert not (root / ckpt.tag_for(killed_at)).exists() or where == "step"

    resumed = run_training("base64-tiny.yaml", _sets(run_dir, shards_64))
    assert f"resumed from {root / ckpt.tag_for(expected)} at step {expected}" in resumed.stdout
    assert not list(root.glob(ckpt.STAGING_PREFIX + "*"))  # leftovers were cleared
    _assert_same(straight[1], _weights(root / ckpt.tag_for(MAX_STEPS), tmp_path / "b.safetensors"),
                 f"resumed after SIGKILL at step {killed_at} ({where})")


# Torn or corrupt checkpoints ----------------------------------------------------------------

def test_torn_or_bitflipped_checkpoint_is_named_and_skipped(tmp_path, straight):
    root = tmp_path / "checkpoints"
    shutil.copytree(straight[0] / "checkpoints", root)
    # Bit flip in the newest (same size: only the checksum sees it), truncation in the next.
    newest = root / ckpt.tag_for(12) / "trainer_state_rank00001.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))
    torn = next(p for p in (root / ckpt.tag_for(8)).rglob("*model_states.pt"))
    with open(torn, "r+b") as f:
        f.truncate(torn.stat().st_size // 2)
    messages: list[str] = []
    assert artifacts.find_resume_tag(root, log=messages.append) == ckpt.tag_for(4)
    assert any(str(newest) in m and "sha256" in m for m in messages), messages
    assert any(str(torn) in m and "bytes" in m for m in messages), messages
    # A missing file and a damaged manifest are reported by name too.
    (root / ckpt.tag_for(4) / "config.yaml").unlink()
    with pytest.raises(ckpt.CheckpointError, match="config.yaml is missing"):
        artifacts.verify(root / ckpt.tag_for(4))
    (root / ckpt.tag_for(4) / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is not valid JSON"):
        artifacts.verify(root / ckpt.tag_for(4))
    assert artifacts.find_resume_tag(root, log=messages.append) is None


def test_checkpoint_loads_without_pickle(straight):
    """Our per-rank state loads with weights_only=True; a pickled object in it is refused."""
    folder = straight[0] / "checkpoints" / ckpt.tag_for(4)
    assert ckpt.load_rank_state(folder)["step"] == 4
    evil = folder.parent / "evil"
    evil.mkdir()
    torch.save({"step": 4, "payload": _Boom()}, evil / "trainer_state_rank00000.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rank_state(evil)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imagen-train-pwned",))


# Failing storage ----------------------------------------------------------------------------

@pytest.mark.multirank
def test_checkpoint_write_error_fails_loudly_and_keeps_previous(tmp_path, shards_64):
    """ENOSPC on one rank while writing step 8: the job fails naming it; step 4 and `latest` stay."""
    run_dir = tmp_path / "run"
    proc, elapsed = _launch(_sets(run_dir, shards_64), IMAGEN_TRAIN_FAULT_SAVE_ERROR_STEPS="8@1")
    assert proc.returncode != 0
    assert "rank 1 could not write checkpoint step 8" in proc.stderr and "No space left" in proc.stderr
    assert elapsed < EXIT_BOUND_S
    root = run_dir / "checkpoints"
    assert (root / ckpt.LATEST).read_text().strip() == ckpt.tag_for(4)
    assert artifacts.find_resume_tag(root) == ckpt.tag_for(4)
    assert not (root / ckpt.tag_for(8)).exists()


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.multirank
def test_full_disk_fails_loudly_and_keeps_previous(tmp_path, shards_64, straight):
    """A real full filesystem (tmpfs with room for ~1.5 checkpoints)."""
    one = sum(p.stat().st_size for p in (straight[0] / "checkpoints" / ckpt.tag_for(4)).rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(one * 1.5)):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected write error covers this")
    try:
        run_dir = tmp_path / "run"
        proc, _ = _launch(_sets(run_dir, shards_64, **{"checkpoint.dir": str(disk)}))
        assert proc.returncode != 0
        assert "could not write checkpoint step 8" in proc.stderr, proc.stderr[-4000:]
        assert (disk / ckpt.LATEST).read_text().strip() == ckpt.tag_for(4)
        artifacts.verify(disk / ckpt.tag_for(4))
        assert not list(disk.glob(ckpt.STAGING_PREFIX + "*"))  # space given back
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_flaky_pipe_shard_is_retried_with_backoff(tmp_path, shards_64):
    shard = shards_64.urls[0]
    expected = [s["__key__"] for s in iter_raw_samples(shard)]
    counter = tmp_path / "attempts"
    counter.write_text("0")
    # Fails twice (half a tar, then exit 1), then works.
    cmd = (f"pipe:n=$(cat {counter}); echo $((n+1)) > {counter}; "
           f"if [ $n -lt 2 ]; then head -c 5000 {shard}; exit 1; fi; cat {shard}")
    errors: list = []
    start = time.monotonic()
    keys = [s["__key__"] for s in iter_raw_samples(cmd, errors.append, retries=3, backoff_s=0.2)]
    assert keys == expected and errors == []
    assert counter.read_text().strip() == "3"
    assert time.monotonic() - start >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s


def test_stalled_or_failing_shard_is_skipped_and_counted(tmp_path, shards_64):
    stall = "pipe:sleep 60"
    errors: list = []
    start = time.monotonic()
    assert list(iter_raw_samples(stall, lambda *e: errors.append(e), retries=1, backoff_s=0.1,
                                 timeout_s=1.0)) == []
    assert time.monotonic() - start < 10
    assert len(errors) == 1 and "no data for 1.0 s" in errors[0][2] and "after 2 attempts" in errors[0][2]
    # Through the loader: a failing shard among good ones is skipped and counted, training goes on.
    cfg = load_config(REPO / "configs" / "base64-tiny.yaml", tiny_overrides(
        tmp_path / "run", f"{shards_64.pattern}::pipe:exit 3", shards_64.embed_dim, **{
            "data.resampled": False, "data.read_retries": 1, "data.retry_backoff_s": 0.01}))
    loader = build_train_loader(cfg)
    batches = []
    with pytest.raises(StopIteration):
        while True:
            batches.append(next(loader))
    assert len(batches) == shards_64.num_samples // 4
    assert loader.stats["skipped"] == {"bad_shard": 1}
    assert any("pipe:exit 3" in e and "status 3" in e for e in loader.stats["examples"])


# Untrusted data never runs code -------------------------------------------------------------

def test_hostile_shard_members_are_skipped_never_unpickled(tmp_path, shards_64, monkeypatch):
    """Hostile members are skipped by name and content, and nothing on the way unpickles at all:
    every unpickling entry point (pickle's, and torch.load's) raises while the loader reads."""
    unpickled = []

    def refuse(*args, **kwargs):  # recorded too: the loader might catch the error and skip
        unpickled.append(args)
        raise AssertionError("the data path unpickled something")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(type("P", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})())
    good = next(iter_raw_samples(shards_64.urls[0]))
    base = {k: v for k, v in good.items() if not k.startswith("__")}
    obj = io.BytesIO()
    np.save(obj, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    members = {}
    for key, extra in (("a", {"pickle": payload}), ("b", {"meta.pyd": payload}), ("c", {"pth": payload}),
                       ("e", {}), ("f", {})):
        for ext, data in {**base, **extra}.items():
            members[f"{key}.{ext}"] = data
    members["f.t5.npy"] = obj.getvalue()  # an object array where the embedding should be
    shard = _tar(tmp_path / "hostile.tar", members)
    cfg = load_config(REPO / "configs" / "base64-tiny.yaml", tiny_overrides(
        tmp_path / "run", str(shard), shards_64.embed_dim, **{"data.resampled": False,
                                                               "training.micro_batch_size": 1,
                                                               "training.global_batch_size": 1}))
    loader = build_train_loader(cfg)
    batches = []
    with pytest.raises(StopIteration):
        while True:
            batches.append(next(loader))
    assert [b["key"][0].split(":")[1] for b in batches] == ["e"]
    stats = loader.stats
    assert stats["skipped"] == {"unsafe_entry": 3, "bad_embedding": 1}, stats
    assert any("hostile.tar:b" in e and ".meta.pyd" in e for e in stats["examples"])
    assert any("hostile.tar:f" in e and "allow_pickle=False" in e for e in stats["examples"])
    assert not marker.exists() and not unpickled


# A finished run's exit ------------------------------------------------------------------------

@pytest.mark.slow
def test_teardown_fault_aborts_an_interpreter_that_tears_down():
    """The injected fault is live: a process that frees its modules at exit dies of SIGABRT
    (and one whose rank it does not name exits normally)."""
    for rank, code in ((0, -6), (1, 0)):
        proc = subprocess.run([sys.executable, "-c", f"import hook_faults; hook_faults.arm_teardown_abort(rank={rank})"],
                              cwd=REPO, env=train_env(IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS="0"), capture_output=True)
        assert proc.returncode == code, proc.stderr.decode()[-2000:]


@pytest.mark.multirank
def test_finished_run_exits_0_even_if_teardown_would_abort(tmp_path, shards_64):
    """Both ranks would abort while the interpreter frees its modules (as gloo's threads did,
    now and then, after a finished ZeRO run): train.py leaves before that, with every record
    written."""
    run_dir = tmp_path / "run"
    proc = run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, zero_stage=3, max_steps=2,
        **{"checkpoint.every_steps": 2}), IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS="0,1")
    assert all(f"[fault] rank {r}: abort at interpreter teardown armed" in proc.stderr for r in (0, 1)), proc.stderr
    assert "done at step 2" in proc.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert ckpt.list_complete(run_dir / "checkpoints") == [ckpt.tag_for(2)]
    verify(run_dir / "checkpoints" / ckpt.tag_for(2))


# Non-finite gradients -----------------------------------------------------------------------

@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nan_gradient_on_one_rank_is_skipped_on_all(tmp_path, shards_64, zero_stage):
    """A NaN gradient on rank 1 only (finite loss): every rank skips that update alike."""
    run_dir = tmp_path / "run"
    proc = run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, zero_stage=zero_stage, max_steps=5,
        **{"checkpoint.every_steps": 5}), IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS="3@1")
    assert "non-finite gradient at step 3; the update was skipped on every rank" in proc.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["train/skipped_total"] == 1
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
    # The EMA follows the weights: finite EMA, finite weights (export's raw part needs ZeRO >= 1).
    ema = ema_state_dict(run_dir / "checkpoints" / ckpt.tag_for(5))
    assert all(torch.isfinite(w).all() for w in ema.values())


@pytest.mark.multirank
def test_repeated_nan_gradients_stop_the_run(tmp_path, shards_64):
    run_dir = tmp_path / "run"
    proc = run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=8,
        **{"checkpoint.every_steps": 2, "training.max_bad_steps": 1}),
        expect_rc=1, IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS="3@0")
    assert "non-finite losses in a row" in proc.stderr and "exitcode  : 3" in proc.stderr
    assert artifacts.find_resume_tag(run_dir / "checkpoints") == ckpt.tag_for(2)


# Bad configs and paths ----------------------------------------------------------------------

def test_checkpoint_of_another_stage_is_refused_before_training(tmp_path, shards_64, straight):
    import torch.distributed as tdist

    from imagen_train.training.trainer import Trainer
    cfg = load_config(REPO / "configs" / "sr256-tiny.yaml", tiny_overrides(
        tmp_path / "run", shards_64.pattern, shards_64.embed_dim,
        **{"checkpoint.dir": str(straight[0] / "checkpoints"),
           "data.min_image_size": 32}))  # 64 px shards may feed sr256 (preflight checks image sizes)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint of stage base64, this run trains stage sr256"):
        Trainer(cfg, resume="auto")
    folder = straight[0] / "checkpoints" / ckpt.tag_for(4)
    with pytest.raises(ckpt.CheckpointError, match="stage base64"):
        Trainer(cfg, resume=str(folder))
    assert not tdist.is_initialized()  # refused before any process group or model


def test_missing_encoder_and_unwritable_output_refused_before_training(tmp_path, shards_64):
    import torch.distributed as tdist

    from imagen_train.training.trainer import Trainer

    def cfg(run_dir=tmp_path / "run", **sets):
        return load_config(REPO / "configs" / "base64-tiny.yaml", tiny_overrides(
            run_dir, shards_64.pattern, shards_64.embed_dim, **sets))
    with pytest.raises(ConfigError, match="text.encoder_path"):
        Trainer(cfg(**{"text.encoder_path": str(tmp_path / "no-such-t5")}))
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, 1 << 20):
        try:
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            with pytest.raises(ConfigError, match="run_dir.*writable.*Read-only"):
                Trainer(cfg(run_dir=str(ro / "run")))
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="run_dir.*writable"):
        Trainer(cfg(run_dir=str(blocker / "run")))
    assert not tdist.is_initialized()


def test_checksum_work_is_split_over_ranks(tmp_path):
    """Each rank hashes only its share of the files; together the shares cover every file."""
    import json

    folder = tmp_path / "step_00000001"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}.bin").write_bytes(bytes([i]) * 100)
    entries = {f"f{i}.bin": {"size": 100, "sha256": artifacts.file_sha256(folder / f"f{i}.bin")} for i in range(5)}
    (folder / ckpt.MANIFEST).write_text(json.dumps({"step": 1, "world_size": 2, "files": entries}))
    (folder / "f3.bin").write_bytes(bytes([9]) * 100)  # same size, other bytes: only a checksum sees it
    caught = []
    for rank in range(2):
        try:
            artifacts.verify(folder, share=(rank, 2))
        except ckpt.CheckpointError as err:
            caught.append((rank, str(err)))
    assert len(caught) == 1 and "f3.bin" in caught[0][1]
    assert ckpt.verify_shared(folder) is not None and "f3.bin" in ckpt.verify_shared(folder)
