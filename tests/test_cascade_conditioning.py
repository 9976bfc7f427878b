"""Periodic evaluation of an SR stage through the cascade (evaluation.cascade_from): the earlier
stages draw the low-res input once, the stage under training lifts it, both logged under their own keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagen_train.artifacts import load_exported
from imagen_train.config import ConfigError, load_preset
from imagen_train.diffusion import Diffusion
from imagen_train.evaluation import cascade as cascade_module
from imagen_train.evaluation.periodic import make_periodic_evaluator

from sampling_helpers import build_tiny_clip, export_tiny, random_fid_inception

PROMPTS = ["a red circle at the top left", "a blue square in the center"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cascade_exports")
    return {s: export_tiny(s, root / f"{s}.safetensors", seed=i, live=True)
            for i, s in enumerate(("base64", "sr256"))}


def _config(exports, t5, shards, *extra: str):
    base = json.dumps([{"path": str(exports["base64"]), "sampler": {"steps": 2, "guidance_scale": 2.0}}])
    return load_preset("sr256-tiny", [
        "text.embed_dim=64", f"text.encoder_path={t5}", f"data.eval_shards={shards.pattern}",
        "evaluation.eval_every_steps=1", f"evaluation.prompts={json.dumps(PROMPTS)}",
        "evaluation.sampler.steps=1", "evaluation.sampler.guidance_scale=1.0", f"evaluation.cascade_from={base}",
        *extra])


def _materialize(export: Path):
    """`materialize_ema(dtype, device)` as training hands it over: the export's network."""
    def materialize_ema(dtype, device):
        net, _ = load_exported(export)
        return net.to(device, dtype)
    return materialize_ema


def test_the_stage_lifts_what_the_earlier_stages_drew_once(tmp_path, exports, tiny_t5_dir, shards_1024,
                                                           monkeypatch):
    inception = random_fid_inception(tmp_path / "pt_inception-random.pth")
    clip = build_tiny_clip(tmp_path / "clip")
    cfg = _config(exports, tiny_t5_dir, shards_1024, "evaluation.num_fid_samples=2",
                  f"evaluation.inception_path={inception}", f"evaluation.clip_path={clip}")
    evaluator = make_periodic_evaluator(cfg)
    loads, calls = [], []
    load_stage = cascade_module.load_stage
    monkeypatch.setattr(cascade_module, "load_stage", lambda path, *a: loads.append(path) or load_stage(path, *a))
    sample = Diffusion.sample

    def spy(self, net, shape, text_emb, text_mask, sampler_cfg, lowres=None, generator=None):
        result = sample(self, net, shape, text_emb, text_mask, sampler_cfg, lowres, generator)
        calls.append({"shape": tuple(shape), "lowres": None if lowres is None else lowres.clone(),
                      "out": result.images.clone(), "steps": sampler_cfg.steps})
        return result

    monkeypatch.setattr(Diffusion, "sample", spy)
    materialize_ema = _materialize(exports["sr256"])
    logged, images = [], []
    for step in (1, 2):
        evaluator(step=step, materialize_ema=materialize_ema, device=torch.device("cpu"),
                  log=lambda m, s: logged.append((s, m)), log_image=lambda key, path, s, caption="": images.append((key, s)),
                  out_dir=tmp_path / "samples")

    # The base stage was loaded once and drew once, with its own sampler (2 steps), both sets
    # (grid and metrics, 2 rows each) in one batch; nothing of it ran at the second evaluation.
    assert loads == [str(exports["base64"])]
    base_calls = [c for c in calls if c["lowres"] is None]
    assert len(base_calls) == 1 and base_calls[0]["shape"] == (4, 3, 64, 64) and base_calls[0]["steps"] == 2
    drawn = base_calls[0]["out"]
    # Each evaluation's cascade grid lifts exactly those 64 px samples (the grid's two rows),
    # at the stage's output size, with the evaluation's own sampler.
    lifted = [c for c in calls if c["lowres"] is not None and c["shape"] == (2, 3, 256, 256)
              and any(torch.equal(c["lowres"], drawn[i:i + 2]) for i in (0, 2))]
    assert len(lifted) == 4 and all(c["steps"] == 1 for c in lifted)  # grid and metrics, twice
    assert [k for k, s in images] == ["eval/samples", "eval/cascade/samples"] * 2
    for step in (1, 2):
        assert Image.open(tmp_path / "samples" / f"cascade_step_{step}.png").size == (2 * 256 + 6, 256 + 4)
        assert (tmp_path / "samples" / f"step_{step}.png").is_file()
    for _, m in logged:
        for key in ("eval/fid", "eval/cascade/fid", "eval/clip_score", "eval/cascade/clip_score"):
            assert math.isfinite(m[key]), (key, m)
        assert m["eval/cascade/num_samples"] == 2.0


def test_cascade_sources_are_checked_at_start_up(tmp_path, exports, tiny_t5_dir, shards_1024):
    sr = json.dumps([{"path": str(exports["sr256"])}])
    with pytest.raises(ConfigError, match=r"evaluation.cascade_from\[0\].path.*stage sr256"):
        make_periodic_evaluator(_config(exports, tiny_t5_dir, shards_1024, f"evaluation.cascade_from={sr}"))
    missing = json.dumps([str(tmp_path / "nowhere.safetensors")])  # a bare path is a source too
    with pytest.raises(ConfigError, match=r"evaluation.cascade_from\[0\].path.*nowhere"):
        make_periodic_evaluator(_config(exports, tiny_t5_dir, shards_1024, f"evaluation.cascade_from={missing}"))
    two = json.dumps([str(exports["base64"])] * 2)
    with pytest.raises(ConfigError, match=r"evaluation.cascade_from.*one entry per earlier stage of sr256"):
        _config(exports, tiny_t5_dir, shards_1024, f"evaluation.cascade_from={two}")
    with pytest.raises(ConfigError, match=r"evaluation.cascade_from.*earlier stage of base64"):
        load_preset("base64-tiny", [f"evaluation.cascade_from={json.dumps([str(exports['base64'])])}"])
