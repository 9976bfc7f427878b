"""Cascaded sampling (imagen_train/evaluation/cascade.py, launch/sample.py) with tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from imagen_train.config import ConfigError
from imagen_train.evaluation.cascade import generate, load_stage, write_outputs
from imagen_train.evaluation.pipeline_config import load_pipeline_config

from sampling_helpers import export_tiny

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "configs" / "inference_pipeline.yaml"


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {s: export_tiny(s, root / f"{s}.safetensors", seed=i, raw=(s == "base64"))
            for i, s in enumerate(("base64", "sr256", "sr1024"))}


def _overrides(exports, t5, out, **extra) -> list[str]:
    sets = {"checkpoints.base64": exports["base64"], "checkpoints.sr256": exports["sr256"],
            "checkpoints.sr1024": exports["sr1024"], "encoder_path": t5, "output_path": out,
            "device": "cpu", "num_images_per_prompt": 1, "texts": "[a red circle, a blue square]",
            "samplers.base64.steps": 2, "samplers.base64.guidance_scale": 3.0,
            "samplers.sr256.steps": 1, "samplers.sr256.guidance_scale": 2.0,
            "samplers.sr1024.steps": 1, "samplers.sr1024.guidance_scale": 1.0}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.mark.slow
def test_cascade_64_256_1024_writes_images_grids_and_json(tmp_path, tiny_exports, tiny_t5_dir):
    out = tmp_path / "out"
    final = {"samplers.sr256.final_denoise_sigma": 0.5, "samplers.sr256.final_denoise_draws": 2}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "sample.py"), "--config", str(PIPELINE)]
                          + [a for s in _overrides(tiny_exports, tiny_t5_dir, out, **final) for a in ("--set", s)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for p in range(2):
        img = Image.open(out / "images" / f"p{p:03d}_i00.png")
        assert img.size == (1024, 1024) and img.mode == "RGB"
        assert (out / "grids" / f"p{p:03d}.png").is_file()
    summary = json.loads((out / "settings.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["text_encoder", "base64", "sr256", "sr1024"]
    assert [stages[s]["resolution"] for s in ("base64", "sr256", "sr1024")] == [64, 256, 1024]
    # Heun: 2N - 1 network calls; guided stages batch cond + uncond together.
    assert (stages["base64"]["nfe_per_image"], stages["base64"]["net_batch_factor"]) == (3, 2)
    assert (stages["sr1024"]["nfe_per_image"], stages["sr1024"]["net_batch_factor"]) == (1, 1)
    # sr256 ends on the mean of two unguided predictions; the other stages have none.
    assert [stages[s]["final_nfe_per_image"] for s in ("base64", "sr256", "sr1024")] == [0, 2, 0]
    assert "NFE 1 + 2 final" in proc.stdout
    assert all(s["time_s"] > 0 and "peak_mem_gib" in s for s in summary["stages"])
    assert summary["settings"]["samplers"]["sr256"]["guidance_scale"] == 2.0
    assert summary["prompts"] == ["a red circle", "a blue square"]


@pytest.mark.slow
def test_each_stage_gets_the_previous_output_unclamped_at_native_size(tiny_exports, tiny_t5_dir, tmp_path,
                                                                      monkeypatch):
    from imagen_train.diffusion import Diffusion

    seen = []
    original = Diffusion.sample

    def spy(self, net, shape, text_emb, text_mask, sampler_cfg, lowres=None, generator=None):
        result = original(self, net, shape, text_emb, text_mask, sampler_cfg, lowres, generator)
        seen.append((tuple(shape), None if lowres is None else lowres.clone(), result.images.clone()))
        result.images = result.images * 3.0  # push outside [-1, 1]: must not be clamped on the way
        return result

    monkeypatch.setattr(Diffusion, "sample", spy)
    cfg = load_pipeline_config(PIPELINE, _overrides(tiny_exports, tiny_t5_dir, tmp_path, target_resolution=256,
                                                    texts="[a red circle]"))
    result = generate(cfg, cfg.prompts(), keep_stage_images=True)
    (base_shape, base_low, base_out), (sr_shape, sr_low, _) = seen
    assert base_shape == (1, 3, 64, 64) and base_low is None
    assert sr_shape == (1, 3, 256, 256) and sr_low.shape == (1, 3, 64, 64)
    torch.testing.assert_close(sr_low, base_out * 3.0)
    assert sr_low.abs().max() > 1.0
    assert result.images.shape == (1, 3, 256, 256)
    assert [s.stage for s in result.stats] == ["text_encoder", "base64", "sr256"]


def test_base_stage_bf16_autocast_and_raw_weights(tiny_exports, tiny_t5_dir, tmp_path):
    cfg = load_pipeline_config(PIPELINE, _overrides(tiny_exports, tiny_t5_dir, tmp_path, target_resolution=64,
                                                    inference_precision="AMP", run_ema_model="false",
                                                    dynamic_thresholding="false"))
    assert cfg.stages == ("base64",) and cfg.sampler_for("base64").thresholding == "static"
    result = generate(cfg, cfg.prompts())
    write_outputs(cfg, result, cfg.prompts())
    assert result.images.shape == (2, 3, 64, 64) and torch.isfinite(result.images).all()
    base = result.stats[-1]
    assert base.dtype == "amp_bfloat16" and base.weights == "raw"
    # 16: bf16 weights on a CPU.
    net, _ = load_stage(str(tiny_exports["base64"]), True, torch.device("cpu"), torch.bfloat16)
    assert next(net.parameters()).dtype == torch.bfloat16


def test_checkpoint_folder_stitches_the_ema_slices(tiny_exports, tmp_path):
    from safetensors.torch import load_file

    from imagen_train.artifacts import load_exported

    net, cfg = load_exported(tiny_exports["sr256"])
    folder = tmp_path / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (folder.parent / "latest").write_text("step_00000010")
    full = {k: v for k, v in net.state_dict().items()}
    layout = {k: {"shape": list(v.shape), "numel": v.numel()} for k, v in full.items()}
    for rank in range(2):  # each rank saved a padded slice of every flattened parameter
        shadow = {}
        for k, v in full.items():
            part = -(-v.numel() // 2)
            flat = torch.nn.functional.pad(v.reshape(-1), (0, 2 * part - v.numel()))
            shadow[k] = flat[rank * part:(rank + 1) * part].clone()
        torch.save({"world_size": 2, "layout": layout, "ema": {"shadow": shadow}},
                   folder / f"trainer_state_rank{rank}.pt")
    stitched, scfg = load_stage(str(folder.parent), True, torch.device("cpu"), torch.float32)
    assert scfg.stage == "sr256"
    ref = {k[len("ema."):]: v for k, v in load_file(str(tiny_exports["sr256"])).items()}
    for k, v in stitched.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_pipeline_config_errors_name_the_key(tmp_path, tiny_exports, tiny_t5_dir):
    with pytest.raises(ConfigError, match="checkpoints.sr1024"):
        load_pipeline_config(PIPELINE, ["checkpoints.sr1024=null"])
    with pytest.raises(ConfigError, match="inference_precision"):
        load_pipeline_config(PIPELINE, ["inference_precision=8"])
    with pytest.raises(ConfigError, match="samplers.base64.stepz"):
        load_pipeline_config(PIPELINE, ["samplers.base64.stepz=3"])
    cfg = load_pipeline_config(PIPELINE, _overrides(tiny_exports, tiny_t5_dir, tmp_path, target_resolution=64,
                                                    encoder_path="null"))
    with pytest.raises(ConfigError, match="encoder_path"):
        generate(cfg, cfg.prompts())
