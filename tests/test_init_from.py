"""training.init_from: a new run from exported weights (any world size or ZeRO stage)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imagen_train import artifacts
from imagen_train.artifacts import CONFIG_KEY, export_checkpoint, load_exported
from imagen_train.config import ConfigError, load_config
from imagen_train.models import build_model
from imagen_train.training import checkpoint as ckpt
from imagen_train.training.init_from import check_init_from, load_init_weights
from train_helpers import REPO, launch_command, run_training, tiny_overrides, train_env

CONFIG = REPO / "configs" / "base64-tiny.yaml"


def tiny_cfg(*overrides: str):
    return load_config(str(CONFIG), list(overrides))


def write_export(path: Path, cfg, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    return path


@pytest.fixture
def export_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = tiny_cfg()
    torch.manual_seed(1)
    state = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).state_dict()
    return write_export(tmp_path / "w.safetensors", cfg, {f"ema.{k}": v for k, v in state.items()}), state


def test_init_from_must_be_a_safetensors_path():
    with pytest.raises(ConfigError, match="training.init_from"):
        tiny_cfg("training.init_from=runs/x/checkpoints")


def test_missing_file_names_the_key_and_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"training.init_from.*nope.safetensors.*no such file"):
        check_init_from(tiny_cfg(f"training.init_from={path}"))


def test_not_an_export(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"training.init_from.*junk.safetensors"):
        check_init_from(tiny_cfg(f"training.init_from={path}"))
    bare = tmp_path / "bare.safetensors"
    save_file({"ema.x": torch.zeros(1)}, str(bare))  # no config metadata
    with pytest.raises(ConfigError, match=r"training.init_from.*bare.safetensors.*no 'imagen_train_config'"):
        check_init_from(tiny_cfg(f"training.init_from={bare}"))


def test_wrong_stage_is_refused(tmp_path, export_file):
    path, state = export_file
    sr = load_config(str(REPO / "configs" / "sr256-tiny.yaml"), [])
    other = write_export(tmp_path / "sr.safetensors", sr, {f"ema.{k}": v for k, v in state.items()})
    with pytest.raises(ConfigError, match=r"training.init_from.*an export of stage base64.*stage sr256"):
        check_init_from(tiny_cfg(f"training.init_from={other}"))
    check_init_from(tiny_cfg(f"training.init_from={path}"))  # the right stage passes


def test_raw_weights_must_be_in_the_file(export_file):
    path, _ = export_file
    with pytest.raises(ConfigError, match=r"training.init_from_weights.*--raw"):
        check_init_from(tiny_cfg(f"training.init_from={path}", "training.init_from_weights=raw"))


def test_loads_exact_weights_and_refuses_other_networks(tmp_path, export_file):
    path, state = export_file
    cfg = tiny_cfg(f"training.init_from={path}")
    torch.manual_seed(2)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    load_init_weights(net, cfg)
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name]), name

    missing = dict(state)
    dropped = sorted(missing)[0]
    del missing[dropped]
    extra = {**state, "extra.weight": torch.zeros(2)}
    for tensors, pattern in ((missing, rf"1 missing: {dropped}\b"), (extra, r"1 unexpected: extra.weight")):
        bad = write_export(tmp_path / "bad.safetensors", cfg, {f"ema.{k}": v for k, v in tensors.items()})
        with pytest.raises(ConfigError, match=rf"training.init_from.*bad.safetensors.*{pattern}"):
            load_init_weights(net, tiny_cfg(f"training.init_from={bad}"))
    wider = tiny_cfg("model.model_channels=16")
    with pytest.raises(ConfigError, match=r"training.init_from.*w.safetensors.*other shapes.*'[\w.]+' is \[.*\] "
                                          r"there, \[.*\] here"):
        load_init_weights(build_model(wider.model, wider.text, wider.stage, wider.train_resolution),
                          tiny_cfg(f"training.init_from={path}"))


def test_one_weight_assigner_for_exports_and_init_from(tmp_path, export_file, monkeypatch):
    """`training.init_from` and inference both load through `models.assign_weights`: the file's
    bf16 tensors come in the network's fp32, and the same mismatch is one message for both,
    raised as a ConfigError for the config key only where a config named the file."""
    from imagen_train import models
    from imagen_train.training import init_from as init

    path, state = export_file
    cfg = tiny_cfg()
    half = write_export(tmp_path / "bf16.safetensors", cfg, {f"ema.{k}": v.bfloat16() for k, v in state.items()})
    calls = []
    monkeypatch.setattr(init, "assign_weights", lambda *a, **k: calls.append(a[2]) or models.assign_weights(*a, **k))
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    load_init_weights(net, tiny_cfg(f"training.init_from={half}"))
    assert calls == [f"{half} ('ema.' tensors)"]
    for name, value in net.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[name].bfloat16().float()), name
    assert all(p.requires_grad for p in net.parameters())  # trainable, as built

    wrong = dict(state)
    key = sorted(wrong)[0]
    wrong[key] = torch.zeros(3)
    bad = write_export(tmp_path / "bad.safetensors", cfg, {f"ema.{k}": v for k, v in wrong.items()})
    with pytest.raises(models.WeightsMismatchError) as at_inference:
        load_exported(bad)
    with pytest.raises(ConfigError) as at_init:
        load_init_weights(build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution),
                          tiny_cfg(f"training.init_from={bad}"))
    assert f"'{key}' is [3] there" in str(at_inference.value)
    assert at_init.value.key == "training.init_from" and str(at_inference.value) in str(at_init.value.found)


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_export_at_2_ranks_zero2_init_at_1_rank_zero3(tmp_path, shards_64):
    """Same network output at step 0; the EMA starts from the file too; a resume ignores init_from."""
    source = tmp_path / "source"
    run_training("base64-tiny.yaml", tiny_overrides(source, shards_64.pattern, shards_64.embed_dim,
                                                    zero_stage=2, max_steps=3, **{"checkpoint.every_steps": 3}))
    exported = export_checkpoint(source / "checkpoints" / "step_00000003", tmp_path / "src.safetensors",
                                 include_raw=True)
    out = tmp_path / "step0.pt"
    target = tmp_path / "target"
    sets = tiny_overrides(target, shards_64.pattern, shards_64.embed_dim, zero_stage=3, max_steps=2,
                          **{"training.global_batch_size": 4, "checkpoint.every_steps": 2,
                             "training.init_from": str(exported)})
    cmd = launch_command("base64-tiny.yaml", [], nproc=1)[:5] + [str(REPO / "tests" / "init_from_check.py"),
                                                                str(CONFIG), str(out), "train"] + sets
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"initialised from {exported} (ema weights)" in proc.stdout
    reference = torch.load(out, weights_only=True)
    assert torch.equal(reference["output"], reference["exported_output"])  # same process: bit for bit
    net, _ = load_exported(exported)
    with torch.no_grad():
        here = net(**reference["inputs"])
    # This process runs other thread counts (other reduction orders): equal to rounding.
    torch.testing.assert_close(reference["output"], here, rtol=1e-5, atol=1e-6)

    # Resuming the new run: the checkpoint wins, and the log says init_from was ignored.
    resumed = run_training("base64-tiny.yaml", tiny_overrides(
        target, shards_64.pattern, shards_64.embed_dim, zero_stage=3, max_steps=3,
        **{"training.global_batch_size": 4, "training.init_from": str(exported)}), nproc=1)
    log = resumed.stdout + resumed.stderr
    assert "training.init_from" in log and "ignored: resuming" in log and "initialised from" not in log
    assert artifacts.find_resume_tag(target / "checkpoints") == ckpt.tag_for(3)


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_bf16_run_starts_from_the_exports_fp32_values(tmp_path, shards_64):
    """bf16, ZeRO-2 at 2 ranks (uneven master fragments): the module holds the bf16 rounding of
    the file's weights, the fp32 masters and the EMA hold the file's fp32 values exactly."""
    cfg = tiny_cfg()
    torch.manual_seed(4)
    # Values that bf16 cannot hold, so a rounded master would show.
    state = {k: v + 1e-3 * torch.rand_like(v)
             for k, v in build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution).state_dict().items()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())
    exported = write_export(tmp_path / "w.safetensors", cfg, {f"ema.{k}": v for k, v in state.items()})
    sets = tiny_overrides(tmp_path / "run", shards_64.pattern, shards_64.embed_dim, zero_stage=2, max_steps=1,
                          **{"training.precision": "bf16", "training.init_from": str(exported)})
    cmd = launch_command("base64-tiny.yaml", [])[:5] + [str(REPO / "tests" / "init_from_check.py"),
                                                       str(CONFIG), str(tmp_path / "out.pt"), "step0"] + sets
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert torch.load(tmp_path / "out.pt", weights_only=True)["output"].dtype == torch.bfloat16
