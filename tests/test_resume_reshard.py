"""Resuming onto another world size or ZeRO stage keeps the optimizer, the EMA, the step and the
LR schedule (training/resume.py, training/engine_reshard.py; docs/training.md, "Resume"); what
that and the EMA read of DeepSpeed below its API is in training/deepspeed_internals.py, each
item checked here by name."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch

from imagen_train import artifacts
from imagen_train.artifacts import CheckpointError
from imagen_train.training import deepspeed_internals
from imagen_train.training.engine_reshard import sources
from train_helpers import REPO, free_port, read_metrics, tiny_overrides, train_env

pytestmark = pytest.mark.timeout(900)
CONFIG = REPO / "configs" / "base64-tiny.yaml"
LR, WARMUP = 1e-3, 20  # every step of these runs is in the warm-up: a restarted schedule shows


def torchrun(nproc: int, script: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "tests" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


# Pure parts ----------------------------------------------------------------------------------

def test_sources_tile_a_slice_from_the_old_ranks():
    zero2 = [{"params": {"w": [0, 7, 0, 0]}}, {"params": {"w": [7, 10, 0, 0]}}]
    assert sources("w", 0, 10, zero2) == [(0, 0, 7), (1, 7, 10)]
    assert sources("w", 5, 8, zero2) == [(0, 5, 7), (1, 7, 8)]
    zero0 = [{"params": {"w": [0, 10, 0, 0]}}] * 3  # every rank held everything: the first is read
    assert sources("w", 2, 9, zero0) == [(0, 2, 9)]
    # A rank holding none of it (end == start, or absent) is skipped.
    assert sources("w", 0, 10, [zero2[0], {"params": {}}, zero2[1]]) == [(0, 0, 7), (2, 7, 10)]
    with pytest.raises(CheckpointError, match="'w'.*7..10 uncovered"):
        sources("w", 0, 10, zero2[:1])
    with pytest.raises(CheckpointError, match="'v' is not in the checkpoint"):
        sources("v", 0, 1, zero2)


def test_ema_is_recut_from_the_overlapping_slices_only(tmp_path):
    full = torch.arange(10, dtype=torch.float32)
    states = [{"world_size": 2, "layout": {"w": {"shape": [10], "numel": 10, "start": s, "end": e}},
               "ema": {"shadow": {"w": full[s:e].clone()}}} for s, e in ((0, 7), (7, 10))]
    for rank, state in enumerate(states):
        artifacts.checkpoints.write_rank_state(tmp_path, rank, state)
    layout = {"w": {"shape": [10], "numel": 10, "start": 3, "end": 9}}
    assert torch.equal(artifacts.ema_slices_for(tmp_path, layout)["w"], full[3:9])
    # Memory-mapped rank files: the slice of rank 1 that is not needed is never copied.
    mapped = artifacts.read_all_rank_states(tmp_path, mmap=True)
    assert torch.equal(artifacts.ema_slices_for(tmp_path, {"w": {**layout["w"], "start": 0, "end": 5}}, mapped)["w"],
                       full[:5])
    states[1]["layout"]["w"]["start"] = 8  # a gap at element 7
    artifacts.checkpoints.write_rank_state(tmp_path, 1, states[1])
    with pytest.raises(CheckpointError, match="'w'.*cover 5 of the 6 elements"):
        artifacts.ema_slices_for(tmp_path, layout)


# DeepSpeed, one process of 2 ranks ----------------------------------------------------------

# Entries of INTERNALS no CPU engine reaches, and why.
GPU_ONLY = {"optimizer.fp16_groups, fp32_groups_flat": "FP16_Optimizer: ZeRO-0 in bf16/fp16 with "
            "DeepSpeed's fused Adam, an op compiled for a GPU (torch's AdamW gets FP16_UnfusedOptimizer)"}
# Optimizer kinds the CPU cases build (no "fp16": see GPU_ONLY), whose files the cases probe.
CPU_KINDS = ("torch", "zero", "zero3", "fp16-unfused")


@pytest.mark.multirank
def test_deepspeed_internals_the_reshard_reads(tmp_path):
    """Every ZeRO stage as source and as target, fp32 and bf16 (reshard_internals_check.py): the
    re-sliced state equals the saved one by DeepSpeed's own consolidation, and trains on alike.
    Every engine there is probed (deepspeed_internals.probe) and every checkpoint's files
    (probe_checkpoint): each entry of INTERNALS and each file key is read by name on some CPU
    engine (GPU_ONLY aside), so a DeepSpeed upgrade that moves one fails here, naming it."""
    proc = torchrun(2, "reshard_internals_check.py", str(REPO), str(tmp_path))
    lines = proc.stdout.splitlines()
    cases = [line for line in lines if line.startswith("CASE")]
    assert len(cases) == 8 and all(line.endswith(" ok") for line in cases), proc.stdout[-3000:]
    read = {line.removeprefix("INTERNAL ") for line in lines if line.startswith("INTERNAL ")}
    every = {item.name for item in deepspeed_internals.INTERNALS}
    assert set(GPU_ONLY) <= every
    assert every - read == set(GPU_ONLY), f"never read on the CPU: {sorted(every - read - set(GPU_ONLY))}"
    keys = {line.removeprefix("FILEKEY ") for line in lines if line.startswith("FILEKEY ")}
    for kind in CPU_KINDS:
        for file, path in deepspeed_internals.file_keys(kind):
            assert f"{kind} {file} file: {'/'.join(path)}" in keys, (kind, file, path, sorted(keys))


def _internal_names() -> set[str]:
    """The attribute names of INTERNALS' entries that only DeepSpeed's objects have (not
    `optimizer`, `__name__` or `loss_scale`, which our own code uses too)."""
    names = {piece.strip().split(".")[-1] for item in deepspeed_internals.INTERNALS for piece in item.name.split(",")}
    return names - {"optimizer", "__name__", "loss_scale"}


def test_deepspeed_internals_are_touched_in_one_file():
    """No module of ours but training/deepspeed_internals.py reads an attribute of INTERNALS or
    a key of DeepSpeed's files, so an upgrade has one file to fix."""
    names = _internal_names()
    assert {"_hp_mapping", "get_hp_fragment", "ds_tensor", "_get_zero_ckpt_name", "global_steps"} <= names
    keys = {key for kind in CPU_KINDS + ("fp16",) for _, path in deepspeed_internals.file_keys(kind)
            for key in path} - {"module", "optimizer", "state"}
    home = REPO / "imagen_train" / "training" / "deepspeed_internals.py"
    source = home.read_text()
    assert all(name in source for name in names | keys)
    for path in sorted((REPO / "imagen_train").rglob("*.py")):
        if path == home:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names:
                raise AssertionError(f"{path.relative_to(REPO)}:{node.lineno} reads DeepSpeed's .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in keys:
                raise AssertionError(f"{path.relative_to(REPO)}:{node.lineno} reads DeepSpeed's file key {node.value!r}")


def test_probe_names_what_moved():
    """Against a DeepSpeed whose ZeRO-2 wrapper kept none of what we read, the probe lists every
    missing item by name and what it is for (the error an upgrade would give)."""
    class DeepSpeedZeroOptimizer:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    class Engine:
        optimizer, module = DeepSpeedZeroOptimizer(), torch.nn.Linear(2, 2)

        def zero_optimization_stage(self):
            return 2

    with pytest.raises(deepspeed_internals.DeepSpeedInternalsError) as err:
        deepspeed_internals.probe(Engine())
    message = str(err.value)
    for name in ("optimizer.overflow", "param._hp_mapping", "engine._get_ckpt_name", "engine._get_zero_ckpt_name",
                 "engine.global_steps", "optimizer._lazy_init_hp_params_optimizer_state",
                 "optimizer.update_lp_params", "optimizer.loss_scale"):
        assert name in message, (name, message)
    assert "ZeRO 1-2: where a parameter's fp32 master fragment is" in message
    assert "optimizer.optimizer (" not in message and "ds_tensor" not in message  # present, or not ZeRO-3


def test_shm_comm_op_is_skipped_and_a_moved_flag_is_named(monkeypatch):
    """DeepSpeed's comm set-up builds no shared-memory op once `skip_shm_comm_op` ran (the flag
    is the one its builder is known by); a DeepSpeed without that flag gets an error naming it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    compatible = deepspeed.ops.__compatible_ops__
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == deepspeed_internals.SHM_COMM_OP
    monkeypatch.setitem(compatible, deepspeed_internals.SHM_COMM_OP, True)
    deepspeed_internals.skip_shm_comm_op()
    assert compatible[deepspeed_internals.SHM_COMM_OP] is False
    assert build_shm_op() is None
    monkeypatch.delitem(compatible, deepspeed_internals.SHM_COMM_OP)
    with pytest.raises(deepspeed_internals.DeepSpeedInternalsError, match="deepspeed_shm_comm"):
        deepspeed_internals.skip_shm_comm_op()


# The trainer: 2 ranks, then 1, then 2 again ---------------------------------------------------

@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory, shards_64):
    """Run A: ZeRO 2 on 2 ranks (6 steps), resumed on 1 rank (to 9), then on 2 ranks at ZeRO 3
    (to 12, with another data.shuffle_buffer). Run B: ZeRO 3, 2 ranks, 1 rank (with 2 loader
    workers instead of 1), 2 ranks, then once more at the same layout with another shard list (a
    data-only change), then at ZeRO 2 on the same ranks (a stage-only change)."""
    root = tmp_path_factory.mktemp("reshard")
    base = {"lr_schedule.warmup_steps": WARMUP, "optim.lr": LR, "checkpoint.every_steps": 3,
            "checkpoint.keep_last": 10, "data.resampled": True}

    def job(name, zero, steps, **extra):
        sets = tiny_overrides(root / name, shards_64.pattern, shards_64.embed_dim, zero_stage=zero,
                              max_steps=steps, **{**base, **extra})
        return f"{root / name}:" + ",".join(s for s in sets if not s.startswith("run_dir="))

    subset = "::".join(shards_64.urls[:5])
    logs = [torchrun(2, "reshard_check.py", str(CONFIG), job("a", 2, 6), job("b", 3, 6)),
            torchrun(1, "reshard_check.py", str(CONFIG), job("a", 2, 9), job("b", 3, 9, **{"data.num_workers": 2})),
            torchrun(2, "reshard_check.py", str(CONFIG), job("a", 3, 12, **{"data.shuffle_buffer": 8}),
                     job("b", 3, 12), job("b", 3, 14, **{"data.train_shards": subset}),
                     job("b", 2, 16, **{"data.train_shards": subset}))]
    return root, [p.stdout + p.stderr for p in logs]


@pytest.mark.multirank
@pytest.mark.parametrize("run,step", [("a", 6), ("a", 9), ("b", 6), ("b", 9), ("b", 12), ("b", 14)])
def test_optimizer_ema_step_and_lr_equal_what_was_saved(resumed_runs, run, step):
    root, _ = resumed_runs
    saved = torch.load(root / run / f"saved_step{step}.pt", weights_only=False)
    loaded = torch.load(root / run / f"loaded_step{step}.pt", weights_only=False)
    assert loaded["step"] == saved["step"] == step
    assert saved["params"].keys() == loaded["params"].keys()
    for name, (a, b) in ((n, (saved["params"][n], loaded["params"][n])) for n in saved["params"]):
        for what, x, y in zip(("fp32 master", "exp_avg", "exp_avg_sq"), a, b):
            assert torch.equal(x, y), f"{run} step {step}: {what} of {name} differs after the resume"
    for name, w in loaded["weights"].items():  # the module's weights follow the masters
        assert torch.equal(w, loaded["params"][name][0].reshape(w.shape)), name
    assert saved["steps"] == loaded["steps"] == {float(step)}  # Adam's step count
    for name in saved["ema"]:
        assert torch.equal(saved["ema"][name], loaded["ema"][name]), f"EMA of {name}"
    assert loaded["lr"] == saved["lr"] and loaded["counters"] == saved["counters"]
    # And both equal what the checkpoint files hold: the EMA stitched from the rank files.
    stitched = artifacts.ema_state_dict(root / run / "checkpoints" / f"step_{step:08d}")
    assert all(torch.equal(stitched[n], saved["ema"][n]) for n in stitched)


def test_lr_continues_the_schedule_and_loss_stays_in_the_runs_noise(resumed_runs):
    root, _ = resumed_runs
    for run, resumes in (("a", (6, 9)), ("b", (6, 9, 12, 14))):
        metrics = read_metrics(root / run)
        by_step = {m["step"]: m for m in metrics}
        assert sorted(by_step) == list(range(1, max(by_step) + 1))
        for step, m in by_step.items():  # warm-up throughout: LR after step k is LR x (k + 1) / WARMUP
            assert m["train/lr"] == pytest.approx(LR * (step + 1) / WARMUP, rel=1e-6), (run, step)
        for step in resumes:
            before = [by_step[s]["train/loss"] for s in range(step - 2, step + 1)]
            after = by_step[step + 1]["train/loss"]
            assert after <= 1.5 * max(before), f"{run}: loss {after} after resuming step {step}, before {before}"


def test_one_notice_says_what_changed(resumed_runs):
    _, (first, second, third) = resumed_runs

    def notice(log: str, tag: str, written: str) -> str:
        lines = [x for x in log.splitlines() if f"[train] resuming {tag} (written by {written})" in x]
        assert len(lines) == 1, log[-3000:]
        return lines[0]

    assert "[train] resuming" not in first
    a = notice(second, "step_00000006", "2 ranks at ZeRO stage 2")
    assert "on 1 rank at ZeRO stage 2; re-sliced (ranks 2 -> 1): the fp32 masters, Adam's moments" in a
    assert "; changed: ranks 2 -> 1)" in a and "shards are drawn with replacement" in a
    b = notice(second, "step_00000006", "2 ranks at ZeRO stage 3")
    assert "re-sliced (ranks 2 -> 1)" in b and "; changed: ranks 2 -> 1, data.num_workers 1 -> 2)" in b
    a = notice(third, "step_00000009", "1 rank at ZeRO stage 2")
    assert "on 2 ranks at ZeRO stage 3; re-sliced (ranks 1 -> 2, ZeRO stage 2 -> 3)" in a
    assert "; changed: ranks 1 -> 2, data.shuffle_buffer 16 -> 8)" in a
    b = notice(third, "step_00000009", "1 rank at ZeRO stage 3")
    assert "; changed: ranks 1 -> 2, data.num_workers 2 -> 1)" in b
    # B's last resume changes only the shard list: DeepSpeed loads its own files, the data re-splits.
    b = notice(third, "step_00000012", "2 ranks at ZeRO stage 3")
    assert "re-sliced" not in b and "; changed: data.train_shards (another shard list))" in b
    assert "the batches are no longer the old layout's" in b
    # Then at ZeRO 2 on the same 2 ranks: re-sliced, and the data stream goes on exactly.
    b = notice(third, "step_00000014", "2 ranks at ZeRO stage 3")
    assert "on 2 ranks at ZeRO stage 2; re-sliced (ZeRO stage 3 -> 2)" in b and "re-split" not in b
    assert "the batches are the old layout's; sums run in another order" in b
