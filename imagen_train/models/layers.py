"""Building blocks shared by both UNets: norms, noise-level features, ResNet blocks, resampling.

Every block maps `(x, emb, text, text_mask) -> x` so that the UNets run a list of them uniformly
and imagen_train/speedups.py can checkpoint or compile each one from outside; a block ignores the
arguments it does not need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagen_train.models.norm_act import check_fused_mode, norm_film_silu


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (output convs of residual branches start as identity)."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (bf16/fp16 variance is unstable).

    A float32 input is normalised in float32. A bf16/fp16 input is handed to PyTorch's kernel as
    it is, without a full-size float32 copy: both kernels accumulate the mean and variance in
    float32 and write the output in the input's dtype (CPU: ATen/native/cpu/moments_utils.h,
    Welford in `opmath_t`, float for bf16/fp16; CUDA: group_norm_kernel.cu, Welford in
    `acc_type<T, true>`, float). The CUDA kernel takes its weights in the input's dtype, the CPU
    kernel in float32 ("mixed type", which also keeps the statistics it saves for backward in
    float32; CUDA saves them in the input's dtype). Exception: a channels_last bf16/fp16 map on a
    CPU, where PyTorch's mixed-type kernel measured 2-15x slower than the copy (bench/norm_act.py
    --dtype bf16, docs/benchmarks.md), keeps the copy. `upcast_input` restores the old path
    everywhere (`speedups.apply_groupnorm_upcast`, a benchmark baseline).
    """

    upcast_input = False

    def _copies(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through a float32 copy (see the class docstring)."""
        if x.dtype not in (torch.float16, torch.bfloat16) or self.upcast_input:
            return True
        return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._copies(x):
            dtype = torch.float32 if x.device.type == "cpu" else x.dtype
            weight = None if self.weight is None else self.weight.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
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
    autograd function (norm_act.FUSED_MODES; set from outside by `speedups.apply_fused_norm`); the
    same values either way.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float = 0.0,
                 fused_norm_act: str = "never"):
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

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, fused_norm_act: str = "never"):
        super().__init__()
        self.fused_norm_act = check_fused_mode(fused_norm_act)
        self.norm = GroupNorm32(num_groups, in_ch)
        self.conv = zero_module(nn.Conv2d(in_ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(norm_film_silu(self.norm, x, fused=self.fused_norm_act))

