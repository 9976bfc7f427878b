"""Tiny random-weight stage exports for the sampling and evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_tools.make_eval_models import random_clip, random_fid_inception as make_random_inception
from imagen_train.config import load_preset
from imagen_train.artifacts import CONFIG_KEY
from imagen_train.models import build_model
from imagen_train.stages import STAGES

TINY_PRESETS = {name: stage.tiny_preset for name, stage in STAGES.items()}


def export_tiny(stage: str, out: Path, embed_dim: int = 64, seed: int = 0, raw: bool = False,
                live: bool = False) -> Path:
    """Build the tiny preset of `stage` with random weights and write it as load_exported reads it
    (tensors prefixed `ema.`, optionally `raw.`, the config JSON in the metadata).

    `live` adds noise to every weight, so the zero-initialised output layers do not make the
    network's output independent of its inputs (text included).
    """
    cfg = load_preset(TINY_PRESETS[stage], [f"text.embed_dim={embed_dim}"])
    torch.manual_seed(seed)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    if live:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    tensors = {f"ema.{k}": v.contiguous() for k, v in net.state_dict().items()}
    if raw:
        tensors.update({f"raw.{k}": (v + 0.01).contiguous() for k, v in net.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    return out


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-weight tiny CLIPModel and tokenizer (`data_tools make-eval-models` builds it)."""
    return random_clip(folder, seed)


def random_fid_inception(path: Path, seed: int = 0, drop_batch_counters: bool = True) -> Path:
    """Our FID Inception with random weights and BatchNorm statistics, saved as the ported TF file is."""
    return make_random_inception(path, seed, drop_batch_counters)
