"""Tiny random-weight stage exports for the sampling and evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

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
    """A random-weight CLIPModel (tiny text and vision towers) and a character-level CLIP
    tokenizer (built with vocab=/merges=, which transformers 5 needs), saved to `folder`."""
    import string

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def random_fid_inception(path: Path, seed: int = 0, drop_batch_counters: bool = True) -> Path:
    """Our FID Inception with random weights and BatchNorm statistics, saved as a .pth the way the
    ported TF file is (no num_batches_tracked entries)."""
    from imagen_train.evaluation.inception import FIDInceptionV3

    net = FIDInceptionV3.random(seed)  # scale-preserving, so features tell images apart
    torch.manual_seed(seed)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    if drop_batch_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
