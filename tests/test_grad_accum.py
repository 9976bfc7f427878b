"""Gradient accumulation in fp32 under bf16: the DeepSpeed config we generate, its validation, and
that DeepSpeed 0.19.8 honours it at ZeRO 1-3 (bench/grad_accum.py at one CPU rank)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagen_train.config import ConfigError, load_preset
from imagen_train.training.engine import build_deepspeed_config

from train_helpers import free_port, train_env

REPO = Path(__file__).resolve().parent.parent


def _ds(precision: str, stage: int, choice: str = "auto", extra: str = "{}") -> dict:
    cfg = load_preset("base64-tiny", [f"training.precision={precision}", f"training.zero_stage={stage}",
                                      f"training.grad_accum_dtype={choice}", "training.global_batch_size=32",
                                      f"training.deepspeed_extra={extra}"])
    return build_deepspeed_config(cfg, 2, on_cpu=False)


@pytest.mark.parametrize("precision,stage,choice,expected", [
    ("bf16", 1, "auto", "fp32"), ("bf16", 2, "auto", "fp32"), ("bf16", 3, "auto", "fp32"),
    ("bf16", 0, "auto", None),            # DeepSpeed has no fp32 accumulation without ZeRO
    ("bf16", 2, "bf16", "bf16"), ("bf16", 3, "fp32", "fp32"),
    ("fp32", 2, "auto", None), ("fp32", 0, "fp32", None),  # fp32 runs accumulate in fp32 anyway
    ("fp16", 2, "auto", None), ("fp16", 2, "fp32", "fp32")])
def test_generated_config_sets_the_accumulation_dtype(precision, stage, choice, expected):
    ds = _ds(precision, stage, choice)
    assert ds["gradient_accumulation_steps"] == 2  # 32 / (8 x 2 ranks): the config accumulates
    assert ds.get("data_types", {}).get("grad_accum_dtype") == expected


def test_dtypes_deepspeed_cannot_run_are_refused_naming_the_key():
    # training.deepspeed_extra still has the last word.
    assert _ds("bf16", 2, extra="{data_types: {grad_accum_dtype: bf16}}")["data_types"] == {"grad_accum_dtype": "bf16"}
    with pytest.raises(ConfigError, match=r"training.grad_accum_dtype.*zero_stage=0"):
        load_preset("base64-tiny", ["training.precision=bf16", "training.zero_stage=0",
                                    "training.grad_accum_dtype=fp32"])
    with pytest.raises(ConfigError, match=r"training.grad_accum_dtype.*precision=fp32"):
        load_preset("base64-tiny", ["training.precision=fp32", "training.grad_accum_dtype=bf16"])
    with pytest.raises(ConfigError, match="training.grad_accum_dtype"):
        load_preset("base64-tiny", ["training.grad_accum_dtype=fp64"])


@pytest.mark.multirank
def test_deepspeed_accumulates_in_fp32_at_zero_1_2_3(tmp_path):
    """A real bf16 engine per stage, 2 micro batches per step: DeepSpeed resolves fp32
    accumulation, holds an fp32 gradient buffer (4 more fp32 bytes per parameter at one rank) in
    place of a bf16 one, trains, and the EMA still finds every fp32 master element."""
    out = tmp_path / "grad_accum.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(REPO / "bench" / "grad_accum.py"), "--stages", "1", "2", "3", "--accum", "2", "--steps", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {(r["zero_stage"], r["grad_accum_dtype"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [(s, d) for s in (1, 2, 3) for d in ("bf16", "fp32")]
    for stage in (1, 2, 3):
        fp32, bf16 = rows[stage, "fp32"], rows[stage, "bf16"]
        assert fp32["deepspeed_data_types"] == ["torch.bfloat16", "torch.float32"], stage
        assert bf16["deepspeed_data_types"] == ["torch.bfloat16", "torch.bfloat16"], stage
        numel = fp32["parameters"]
        held32, held16 = fp32["held_bytes"], bf16["held_bytes"]
        assert held32["torch.float32"] - held16["torch.float32"] >= 4 * numel, (stage, held32, held16)
        assert held32["torch.bfloat16"] < held16["torch.bfloat16"], (stage, held32, held16)
        for row in (fp32, bf16):
            assert row["ema_elements"] == numel and len(row["losses"]) == 4
            assert all(0 < loss < 10 for loss in row["losses"]), row["losses"]
    assert rows[1, "fp32"]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's choice at ZeRO-1
