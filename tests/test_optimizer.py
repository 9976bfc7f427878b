"""The optimizer DeepSpeed steps: torch's fused AdamW by default (nothing to compile), DeepSpeed's
JIT-built FusedAdam on request, built in the preflight before any data or model work."""

from __future__ import annotations

import types

import pytest
import torch

from imagen_train.config import ConfigError, load_config
from imagen_train.training import engine
from imagen_train.training.preflight import preflight
from train_helpers import REPO, read_metrics, run_training, tiny_overrides


def _cfg(tmp_path, shards: str, **sets):
    return load_config(REPO / "configs" / "base64-tiny.yaml", tiny_overrides(tmp_path / "run", shards, 64, **sets))


@pytest.mark.parametrize("on_cpu", [True, False])
def test_default_is_torch_fused_adamw_on_every_device(tmp_path, on_cpu):
    cfg = _cfg(tmp_path, "unused.tar", **{"training.precision": "bf16"})
    adam = engine.build_deepspeed_config(cfg, 1, on_cpu=on_cpu)["optimizer"]
    assert adam["type"] == "AdamW"
    assert adam["params"]["torch_adam"] is True and adam["params"]["fused"] is True
    assert adam["params"]["lr"] == cfg.optim.lr
    assert engine.compiled_optimizer_op(cfg) is None


def test_deepspeed_fused_and_offload_ask_for_compiled_ops(tmp_path):
    fused = _cfg(tmp_path, "unused.tar", **{"optim.implementation": "deepspeed-fused"})
    params = engine.build_deepspeed_config(fused, 1, on_cpu=False)["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params  # DeepSpeed's FusedAdam
    assert engine.compiled_optimizer_op(fused) == "FusedAdamBuilder"
    offload = _cfg(tmp_path, "unused.tar", **{"training.offload_optimizer": True})
    ds = engine.build_deepspeed_config(offload, 1, on_cpu=False)
    assert "torch_adam" not in ds["optimizer"]["params"] and "fused" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert engine.compiled_optimizer_op(offload) == "CPUAdamBuilder"
    foreach = _cfg(tmp_path, "unused.tar", **{"optim.implementation": "torch-foreach"})
    assert engine.build_deepspeed_config(foreach, 1, on_cpu=False)["optimizer"]["params"]["foreach"] is True
    with pytest.raises(ConfigError, match="optim.implementation"):
        _cfg(tmp_path, "unused.tar", **{"optim.implementation": "apex"})


class _FailingBuilder:
    def load(self, verbose=False):
        raise ValueError("invalid literal for int() with base 10: '0a'")  # seen with TORCH_CUDA_ARCH_LIST=9.0a


def test_preflight_builds_the_compiled_op_before_any_data_work(tmp_path, monkeypatch):
    asked = []
    accelerator = types.SimpleNamespace(create_op_builder=lambda name: asked.append(name) or _FailingBuilder())
    monkeypatch.setattr(engine, "get_accelerator", lambda: accelerator)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    # The shards do not exist: the optimizer's error comes first, so no data was looked at.
    cfg = _cfg(tmp_path, str(tmp_path / "missing-{00000..00001}.tar"), **{"optim.implementation": "deepspeed-fused"})
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 1)
    message = str(err.value)
    assert "optim.implementation" in message and "TORCH_CUDA_ARCH_LIST='9.0a'" in message
    assert "torch-fused" in message and "invalid literal" in message
    assert asked == ["FusedAdamBuilder"]
    # The default builds nothing and goes on to the data checks.
    asked.clear()
    with pytest.raises(ConfigError, match="data.train_shards"):
        preflight(_cfg(tmp_path, str(tmp_path / "missing-{00000..00001}.tar")), 1)
    assert asked == []


def test_check_refuses_an_engine_whose_adamw_is_not_fused(tmp_path):
    cfg = _cfg(tmp_path, "unused.tar")
    param = torch.nn.Parameter(torch.zeros(3))
    unfused = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=torch.optim.AdamW([param])))
    with pytest.raises(ConfigError, match="optim.implementation.*fused="):
        engine._check_optimizer(cfg, unfused)
    fused = types.SimpleNamespace(optimizer=torch.optim.AdamW([param], fused=True))
    engine._check_optimizer(cfg, fused)
    assert engine.describe_optimizer(fused) == "AdamW(fused=True)"


@pytest.mark.multirank
def test_training_steps_torch_fused_adamw_through_deepspeed(tmp_path, shards_64):
    """The whole path: config -> DeepSpeed's torch_adam switch -> torch.optim.AdamW(fused=True)."""
    run_dir = tmp_path / "run"
    proc = run_training("base64-tiny.yaml", tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim,
                                                           max_steps=2), nproc=1)
    assert "[train] optimizer AdamW(fused=True) under DeepSpeedZeroOptimizer" in proc.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
