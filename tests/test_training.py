"""Training on DeepSpeed: 2 CPU ranks over gloo, tiny presets, fp32."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagen_train import artifacts
from imagen_train.artifacts import load_exported
from imagen_train.config import ConfigError, load_config
from imagen_train.training import checkpoint as ckpt
from imagen_train.artifacts import export_checkpoint
from imagen_train.training.preflight import preflight
from train_helpers import (REPO, free_port, launch_command, read_metrics, run_training, tiny_overrides,
                           train_env)

pytestmark = pytest.mark.timeout(900)


def child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def exported(run_dir: Path, tmp: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    folder = artifacts.find_resume_tag(run_dir / "checkpoints")
    out = export_checkpoint(run_dir / "checkpoints" / folder, tmp / f"{name}.safetensors", include_raw=True)
    return load_file(str(out))


@pytest.mark.multirank
def test_training_through_the_loader_makes_the_loss_fall(tmp_path, shards_64, zero_stage=2):
    """40 steps of the tiny preset on the shards: the loss falls by a fifth, and one complete
    checkpoint stands at the end. ZeRO-2 only: tests/test_numerics.py shows ZeRO 0, 1 and 3 (and
    1 rank with accumulation) log the same losses as ZeRO-2 within 1e-5 on the same batches, and
    ZeRO-3 trains, checkpoints and resumes through the loader in test_exact_resume[3]."""
    run_dir = tmp_path / "run"
    run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, zero_stage=zero_stage, max_steps=40,
        **{"checkpoint.every_steps": 40, "optim.lr": 2e-3}))
    losses = [m["train/loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, f"loss did not fall: first 8 steps {first:.4f}, last 8 {last:.4f}"
    assert ckpt.list_complete(run_dir / "checkpoints") == ["step_00000040"]


# ZeRO-3 only: at ZeRO-2 (the default) exact resume is checked after every stop signal in
# tests/test_preemption.py and after SIGKILL in tests/test_fault_tolerance.py.
@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [3])
def test_exact_resume(tmp_path, shards_64, zero_stage):
    straight, split = tmp_path / "straight", tmp_path / "split"
    sets = dict(zero_stage=zero_stage, **{"data.shuffle_buffer": 8})
    run_training("base64-tiny.yaml", tiny_overrides(straight, shards_64.pattern, shards_64.embed_dim,
                                                    max_steps=20, **sets))
    run_training("base64-tiny.yaml", tiny_overrides(split, shards_64.pattern, shards_64.embed_dim,
                                                    max_steps=10, **sets))
    assert ckpt.list_complete(split / "checkpoints") == ["step_00000010"]
    proc = run_training("base64-tiny.yaml", tiny_overrides(split, shards_64.pattern, shards_64.embed_dim,
                                                           max_steps=20, **sets))
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = exported(straight, tmp_path, "a"), exported(split, tmp_path, "b")
    assert a.keys() == b.keys() and any(k.startswith("raw.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs after resume")
    # The logged losses of steps 11-20 match too.
    la = [m["train/loss"] for m in read_metrics(straight)][10:]
    lb = [m["train/loss"] for m in read_metrics(split)][10:]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.multirank
def test_sigterm_saves_and_resumes(tmp_path, shards_64):
    run_dir = tmp_path / "run"
    sets = tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=100000,
                          **{"checkpoint.every_steps": 100000})
    proc = subprocess.Popen(launch_command("base64-tiny.yaml", sets), cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    # Preemption: the scheduler signals the training processes (torchrun's children).
    workers = child_pids(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    tag = artifacts.find_resume_tag(run_dir / "checkpoints")
    assert tag is not None, out[-4000:]
    step = artifacts.step_of(tag)
    assert step >= 3
    artifacts.verify(run_dir / "checkpoints" / tag)
    resumed = run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=step + 2))
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    assert artifacts.find_resume_tag(run_dir / "checkpoints") == ckpt.tag_for(step + 2)


# A network small enough for bf16 on a CPU (bf16 convolutions are ~70x slower than fp32 there).
BF16_TINY = {"train_resolution": 32, "model.channel_mult": "[1,2]", "model.attention_resolutions": "[16]",
             "model.num_head_channels": 8, "training.micro_batch_size": 2, "training.global_batch_size": 4}


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage,precision", [(3, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")])
def test_ema_follows_fp32_masters_and_export(tmp_path, shards_64, zero_stage, precision):
    """The per-rank EMA slices, stitched, equal a hand EMA of the full fp32 master weights (in bf16
    runs too: not of the bf16 module weights); the export holds exactly that EMA."""
    run_dir = tmp_path / "run"
    out = tmp_path / "hand_ema.pt"
    extra = {"checkpoint.every_steps": 6, "ema.decay": 0.7, "training.precision": precision}
    if precision == "bf16":
        extra.update(BF16_TINY)
    sets = tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim, zero_stage=zero_stage, max_steps=6,
                          **extra)
    cmd = launch_command("base64-tiny.yaml", [])[:5] + [str(REPO / "tests" / "dist_ema_check.py"),
                                                       str(REPO / "configs" / "base64-tiny.yaml"), str(out)] + sets
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reference = torch.load(out, weights_only=True)
    assert reference["max_ema_error"] < 1e-6
    exported_file = export_checkpoint(run_dir / "checkpoints" / "step_00000006", tmp_path / "ema.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(str(exported_file))
    assert set(tensors) == {f"ema.{k}" for k in reference["hand_ema"]}
    for name, value in reference["hand_ema"].items():
        torch.testing.assert_close(tensors[f"ema.{name}"], value, rtol=0, atol=1e-6, msg=name)
    net, cfg = load_exported(exported_file)
    assert cfg.stage == "base64" and cfg.training.zero_stage == zero_stage
    with torch.no_grad():
        output = net(**reference["inputs"])
    torch.testing.assert_close(output, reference["output"], rtol=1e-5, atol=1e-6)
    assert output.abs().sum() > 0


@pytest.mark.multirank
def test_nan_loss_is_skipped_then_stops(tmp_path, shards_64):
    run_dir = tmp_path / "skip"
    proc = run_training("base64-tiny.yaml", tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim,
                                                           max_steps=5), IMAGEN_TRAIN_FAULT_NAN_STEPS="3")
    assert "non-finite loss at step 3" in proc.stdout + proc.stderr
    assert len(read_metrics(run_dir)) == 5
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in read_metrics(run_dir))

    run_dir = tmp_path / "stop"
    proc = run_training("base64-tiny.yaml", tiny_overrides(
        run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=8,
        **{"checkpoint.every_steps": 2, "training.max_bad_steps": 1}),
        expect_rc=1, IMAGEN_TRAIN_FAULT_NAN_STEPS="5")  # torchrun exits 1 when ranks fail
    assert "non-finite losses in a row" in proc.stderr
    assert "exitcode  : 3" in proc.stderr  # each rank's own exit code
    assert artifacts.find_resume_tag(run_dir / "checkpoints") == "step_00000004"


def _cfg(tmp_path, shards, **sets):
    over = tiny_overrides(tmp_path / "run", shards, 64, **sets)
    return load_config(REPO / "configs" / "base64-tiny.yaml", over)


def test_bad_inputs_fail_before_training(tmp_path, shards_64):
    with pytest.raises(ConfigError, match="data.train_shards.*no file found"):
        preflight(_cfg(tmp_path, str(tmp_path / "nothing-{00000..00003}.tar")), 2)
    empty = tmp_path / "empty.tar"
    import tarfile
    tarfile.open(empty, "w").close()
    with pytest.raises(ConfigError, match="data.train_shards.*no sample"):
        preflight(_cfg(tmp_path, str(empty)), 2)
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        preflight(_cfg(tmp_path, shards_64.pattern, **{"training.global_batch_size": 12}), 2)
    with pytest.raises(ConfigError, match="train_resolution"):
        _cfg(tmp_path, shards_64.pattern, train_resolution=128)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="checkpoint.dir.*writable"):
        preflight(_cfg(tmp_path, shards_64.pattern, **{"checkpoint.dir": str(blocker / "sub")}), 2)
    with pytest.raises(ConfigError, match="text.encoder_path"):
        preflight(_cfg(tmp_path, shards_64.pattern, **{"text.encoder_path": str(tmp_path / "no-t5")}), 2)
    preflight(_cfg(tmp_path, shards_64.pattern), 2)  # the good config passes


def test_fp16_refused_on_cpu(tmp_path, shards_64):
    from imagen_train.training.engine import build_deepspeed_config
    cfg = _cfg(tmp_path, shards_64.pattern, **{"training.precision": "fp16"})
    with pytest.raises(ConfigError, match="training.precision"):
        build_deepspeed_config(cfg, 2, on_cpu=True)
    ds = build_deepspeed_config(_cfg(tmp_path, shards_64.pattern, **{
        "training.precision": "bf16", "training.zero_stage": 3, "training.global_batch_size": 32,
        "training.deepspeed_extra": "{zero_optimization: {reduce_bucket_size: 1000}}"}), 2, on_cpu=False)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 32
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000


@pytest.mark.multirank
def test_deepspeed_launcher_runs_the_main_job_and_a_resume_continues_its_wandb_run(tmp_path, shards_64):
    """The README's launch line, through the `deepspeed` launcher itself, for the first 2 steps; a
    resume (torchrun) to step 4 then logs to the same W&B run: its id is kept in the checkpoint."""
    run_dir = tmp_path / "run"
    sets = dict(**{"logging.wandb_mode": "offline", "checkpoint.every_steps": 2})
    deepspeed_bin = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed_bin), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "base64-tiny.yaml")]
    for item in tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=2, **sets):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(WANDB_SILENT="true"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert artifacts.find_resume_tag(run_dir / "checkpoints") == "step_00000002"
    first = ckpt.load_rank_state(run_dir / "checkpoints" / "step_00000002")["wandb_id"]
    assert first
    run_training("base64-tiny.yaml", tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim,
                                                    max_steps=4, **sets), WANDB_SILENT="true")
    second = ckpt.load_rank_state(run_dir / "checkpoints" / "step_00000004")["wandb_id"]
    assert second == first
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(first) for name in runs), runs


def test_shutdown_destroys_the_process_group():
    """launch/train.py and launch/evaluate.py end a finished run with dist.shutdown(): destroyed
    before interpreter exit, gloo's threads cannot abort the rank."""
    code = f"""
import torch.distributed as dist
from imagen_train.utils.dist import is_initialized, shutdown
shutdown()  # no process group: nothing to do
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
assert is_initialized()
shutdown()
assert not is_initialized()
shutdown()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    for launcher in ("launch/train.py", "launch/evaluate.py"):
        assert "shutdown()" in (REPO / launcher).read_text()
