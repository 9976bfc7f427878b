"""The conditioning shared by both UNets: noise level(s) and text -> (vector, projected tokens).

Imagen (Saharia et al. 2022, appendix): the noise embedding plus the attention-pooled text
forms the conditioning vector that FiLMs every ResNet block; the projected text tokens feed the
attention layers. The SR networks add the embedded augmentation level of their low-res input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from imagen_train.models.attention import AttentionPool
from imagen_train.models.layers import LayerNorm32, NoiseEmbedding


def noise_feature_dim(model_channels: int) -> int:
    """Sinusoidal features per noise level: model_channels as in ADM, but at least 64 so that
    the tiny networks still see a spread of frequencies between 1 and 1000."""
    return max(model_channels, 64)


class Conditioning(nn.Module):
    """(noise_cond, text_emb, text_mask[, lowres_noise_cond]) -> emb (B, E), text (B, L, cond_dim)."""

    def __init__(self, feature_dim: int, embed_dim: int, text_dim: int, cond_dim: int,
                 head_channels: int, lowres: bool):
        super().__init__()
        self.noise_embed = NoiseEmbedding(feature_dim, embed_dim)
        self.lowres_embed = NoiseEmbedding(feature_dim, embed_dim) if lowres else None
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.pool = AttentionPool(cond_dim, head_channels)
        self.pool_proj = nn.Sequential(LayerNorm32(cond_dim), nn.Linear(cond_dim, embed_dim))

    def forward(self, noise_cond: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor,
                lowres_noise_cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Zero the padding so that whatever it holds (even inf/NaN) cannot leak through the masks.
        text_emb = torch.where(text_mask[..., None], text_emb, 0.0).to(self.text_proj.weight.dtype)
        text = self.text_proj(text_emb)  # (B, L, cond_dim)
        emb = self.noise_embed(noise_cond) + self.pool_proj(self.pool(text, text_mask))  # (B, E)
        if self.lowres_embed is not None:
            if lowres_noise_cond is None:
                raise ValueError("this network needs lowres_noise_cond (the augmentation level)")
            emb = emb + self.lowres_embed(lowres_noise_cond)
        return emb, text
