"""Building blocks shared by both UNets: norms, noise-level features, ResNet blocks, resampling.

Every block maps `(x, emb, text, text_mask) -> x` so that the UNets can run (and checkpoint) a
list of them uniformly; a block ignores the arguments it does not need.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from imagen_train.models.norm_act import check_fused_mode, norm_film_silu


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (output convs of residual branches start as identity)."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 (bf16/fp16 variance is unstable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def noise_features(cond: torch.Tensor, dim: int, max_freq: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of an order-1 scalar: (B,) -> (B, dim), frequencies geometric in [1, max_freq].

    Computed in float32 whatever the model dtype: bf16 cannot resolve cond * 1000.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=cond.device, dtype=torch.float32))
    angles = cond.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, 2 * half)


class NoiseEmbedding(nn.Module):
    """Noise level (or augmentation level) -> conditioning vector: sinusoidal features + 2-layer MLP."""

    def __init__(self, feature_dim: int, embed_dim: int):
        super().__init__()
        self.feature_dim = 2 * (feature_dim // 2)
        self.mlp = nn.Sequential(nn.Linear(self.feature_dim, embed_dim), nn.SiLU(),
                                 nn.Linear(embed_dim, embed_dim))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        features = noise_features(cond, self.feature_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (B, embed_dim)


class ResBlock(nn.Module):
    """ResNet block with scale-shift (FiLM) conditioning on `emb` (ADM, Dhariwal & Nichol 2021).

    x -> GN -> SiLU -> conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv (zero-init), plus
    a (1x1-projected) identity. `fused_norm_act`: where its two GN -> SiLU regions run as one
    autograd function (norm_act.FUSED_MODES); the same values either way.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float = 0.0,
                 fused_norm_act: str = "auto"):
        super().__init__()
        self.fused_norm_act = check_fused_mode(fused_norm_act)
        self.norm1 = GroupNorm32(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = GroupNorm32(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb, text=None, text_mask=None):
        h = self.conv1(norm_film_silu(self.norm1, x, fused=self.fused_norm_act))  # (B, out, H, W)
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = norm_film_silu(self.norm2, h, scale, shift, fused=self.fused_norm_act)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (odd sizes round up)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, text=None, text_mask=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x, emb=None, text=None, text_mask=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class OutputHead(nn.Module):
    """GN -> SiLU -> zero-initialised 3x3 conv to the output channels (`fused_norm_act` as ResBlock's)."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, fused_norm_act: str = "auto"):
        super().__init__()
        self.fused_norm_act = check_fused_mode(fused_norm_act)
        self.norm = GroupNorm32(num_groups, in_ch)
        self.conv = zero_module(nn.Conv2d(in_ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(norm_film_silu(self.norm, x, fused=self.fused_norm_act))


def run_block(block: nn.Module, checkpointing: bool, x, emb, text, text_mask) -> torch.Tensor:
    """Run one block; with `checkpointing` (training, grad enabled) recompute it in backward."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, emb, text, text_mask, use_reentrant=False)
    return block(x, emb, text, text_mask)
