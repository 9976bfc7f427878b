"""Tiny random-weight stage exports for the sampling and evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagen_train.config import load_preset
from imagen_train.models import build_model
from imagen_train.training.export import CONFIG_KEY

TINY_PRESETS = {"base64": "base64-tiny", "sr256": "sr256-tiny", "sr1024": "sr1024-tiny"}


def export_tiny(stage: str, out: Path, embed_dim: int = 64, seed: int = 0, raw: bool = False) -> Path:
    """Build the tiny preset of `stage` with random weights and write it as load_exported reads it
    (tensors prefixed `ema.`, optionally `raw.`, the config JSON in the metadata)."""
    cfg = load_preset(TINY_PRESETS[stage], [f"text.embed_dim={embed_dim}"])
    torch.manual_seed(seed)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
    tensors = {f"ema.{k}": v.contiguous() for k, v in net.state_dict().items()}
    if raw:
        tensors.update({f"raw.{k}": (v + 0.01).contiguous() for k, v in net.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    return out
