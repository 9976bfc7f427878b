"""Denoising networks: the base UNet (64 px) and the Efficient U-Net (SR stages).

Single-device and free of I/O: nothing here imports DeepSpeed, torch.distributed or YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import nn

from imagen_train.models.efficient_unet import EfficientUNet
from imagen_train.models.unet import UNet

if TYPE_CHECKING:
    from imagen_train.config import ModelConfig, TextConfig

__all__ = ["EfficientUNet", "UNet", "build_model", "count_parameters"]

_DEFAULT_RESOLUTION = {"base64": 64, "sr256": 256, "sr1024": 256}


def build_model(model_cfg: ModelConfig, text_cfg: TextConfig, stage: str,
                train_resolution: Optional[int] = None) -> nn.Module:
    """The stage's network, built from its config; `train_resolution` places the attention levels."""
    if stage not in _DEFAULT_RESOLUTION:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(_DEFAULT_RESOLUTION)}")
    resolution = train_resolution or _DEFAULT_RESOLUTION[stage]
    expected = "unet" if stage == "base64" else "efficient_unet"
    if model_cfg.kind != expected:
        raise ValueError(f"stage {stage} needs model.kind {expected!r}, got {model_cfg.kind!r}")
    network = UNet if stage == "base64" else EfficientUNet
    return network(model_cfg, text_cfg.embed_dim, resolution)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
