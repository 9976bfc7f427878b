"""Imagen's Efficient U-Net for the super-resolution stages (Saharia et al. 2022, appendix B.1).

Differences from the base UNet, after the paper: more ResNet blocks at low resolution and fewer
at high (`num_res_blocks` per level); one skip per level, scaled by 1/sqrt(2); on the way down
the strided-conv downsample comes before a level's blocks, on the way up the upsample comes after
them; text attention only at the lowest levels. The low-res image is upsampled to the input size
and concatenated to the noisy input, and its augmentation level joins the conditioning. Every
level without attention is fully convolutional, so the network runs at sizes other than the
one it trains on (sr1024 trains on 256 px crops and samples at 1024 px).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from imagen_train.models.attention import text_attention_blocks
from imagen_train.models.conditioning import Conditioning, noise_feature_dim
from imagen_train.models.layers import Downsample, OutputHead, ResBlock, Upsample
from imagen_train.schema import ModelConfig


SKIP_SCALE = 1.0 / math.sqrt(2.0)


class EfficientUNet(nn.Module):
    """(x, noise_cond, text_emb, text_mask, lowres, lowres_noise_cond) -> (B, out_channels, H, W).

    Level i works at train_resolution / 2^i px. Down level i: [Downsample (i > 0)], blocks[i]
    ResBlocks, attention if its size is in `attention_resolutions`; its output is the level's skip.
    Up level i: [h; skip / sqrt(2)] (no skip at the lowest level, whose input is the down path's
    own output), blocks[i] ResBlocks, attention, Upsample (i > 0).
    """

    def __init__(self, cfg: ModelConfig, text_dim: int, train_resolution: int = 256):
        super().__init__()
        embed_dim = cfg.time_embed_mult * cfg.model_channels
        self.cond = Conditioning(noise_feature_dim(cfg.model_channels), embed_dim, text_dim, cfg.cond_dim,
                                 cfg.num_head_channels, lowres=True)
        chans = [cfg.model_channels * m for m in cfg.channel_mult]
        blocks = cfg.blocks_per_level()
        groups = cfg.num_groups
        levels = len(chans)

        def attention(res: int, ch: int) -> list[nn.Module]:
            if res not in cfg.attention_resolutions:
                return []
            return text_attention_blocks(cfg.attention_type, ch, cfg.cond_dim, cfg.num_head_channels,
                                         groups, cfg.self_attention)

        # The noisy image and the upsampled low-res image, side by side.
        self.input = nn.Conv2d(2 * cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch, res = chans[0], train_resolution
        for level, out_ch in enumerate(chans):
            step: list[nn.Module] = []
            if level > 0:
                step.append(Downsample(ch, out_ch))
                ch, res = out_ch, res // 2
            for _ in range(blocks[level]):
                step.append(ResBlock(ch, out_ch, embed_dim, groups, cfg.dropout))
                ch = out_ch
            step += attention(res, ch)
            self.down.append(nn.ModuleList(step))

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = chans[level]
            cin = ch if level == levels - 1 else ch + out_ch  # [h; skip]
            step = []
            if blocks[level] == 0 and cin != out_ch:  # no ResBlock to merge the skip: a 1x1 conv does
                step.append(_Project(cin, out_ch))
                cin = out_ch
            for _ in range(blocks[level]):
                step.append(ResBlock(cin, out_ch, embed_dim, groups, cfg.dropout))
                cin = out_ch
            ch = out_ch
            step += attention(res, ch)
            if level > 0:
                step.append(Upsample(ch, chans[level - 1]))
                ch, res = chans[level - 1], res * 2
            self.up.append(nn.ModuleList(step))
        self.out = OutputHead(ch, cfg.out_channels, groups)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, text_emb: torch.Tensor,
                text_mask: torch.Tensor, lowres: Optional[torch.Tensor] = None,
                lowres_noise_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Denoiser output (B, 3, H, W) in the dtype of `x`.

        Pass the noise levels in float32 even for a bf16 network: their sinusoidal features
        reach frequency 1000, finer than bf16 resolves.
        """
        if lowres is None or lowres_noise_cond is None:
            raise ValueError("the SR network needs `lowres` and `lowres_noise_cond`")
        text_mask = text_mask.bool()
        emb, text = self.cond(noise_cond, text_emb, text_mask, lowres_noise_cond)
        dtype = self.input.weight.dtype
        if lowres.shape[-2:] != x.shape[-2:]:  # bicubic in float32 (bf16 upsampling is coarse)
            lowres = F.interpolate(lowres.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
        h = self.input(torch.cat([x.to(dtype), lowres.to(dtype)], dim=1))  # (B, C0, H, W)

        skips = []
        for step in self.down:
            for block in step:
                h = block(h, emb, text, text_mask)
            skips.append(h)
        skips.pop()  # the lowest level's output is the up path's input, not a skip
        for i, step in enumerate(self.up):
            if i > 0:
                h = torch.cat([h, skips.pop() * SKIP_SCALE], dim=1)
            for block in step:
                h = block(h, emb, text, text_mask)
        return self.out(h).to(x.dtype)


class _Project(nn.Module):
    """1x1 conv that merges [h; skip] when a level has no ResBlock to do it."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb=None, text=None, text_mask=None):
        return self.conv(x)
