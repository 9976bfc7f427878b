"""Imagen's base 64x64 text-to-image UNet (Saharia et al. 2022, appendix; layout of ADM, Dhariwal &
Nichol 2021): ResNet blocks with FiLM conditioning, text attention at the chosen resolutions, a
skip from every encoder block concatenated into the decoder.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from imagen_train.models.attention import text_attention_blocks
from imagen_train.models.conditioning import Conditioning, noise_feature_dim
from imagen_train.models.layers import Downsample, OutputHead, ResBlock, Upsample
from imagen_train.schema import ModelConfig


class UNet(nn.Module):
    """(x, noise_cond, text_emb, text_mask) -> (B, out_channels, H, W); see docs/CONTRACTS.md.

    Encoder: per level `num_res_blocks` ResBlocks (+ attention at attention resolutions), each
    output kept as a skip, then a strided-conv downsample (also a skip). Middle: ResBlock,
    attention, ResBlock. Decoder: per level `num_res_blocks + 1` ResBlocks on [h; skip], then an
    upsample. `attention_resolutions` are sizes in px at `train_resolution`.
    """

    def __init__(self, cfg: ModelConfig, text_dim: int, train_resolution: int = 64):
        super().__init__()
        embed_dim = cfg.time_embed_mult * cfg.model_channels
        self.cond = Conditioning(noise_feature_dim(cfg.model_channels), embed_dim, text_dim, cfg.cond_dim,
                                 cfg.num_head_channels, lowres=False)
        chans = [cfg.model_channels * m for m in cfg.channel_mult]
        blocks = cfg.blocks_per_level()
        groups = cfg.num_groups

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, groups, cfg.dropout)

        def attention(ch: int) -> list[nn.Module]:
            return text_attention_blocks(cfg.attention_type, ch, cfg.cond_dim, cfg.num_head_channels,
                                         groups, self_attention=True)

        ch = chans[0]
        self.input = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        skip_chs = [ch]
        res = train_resolution
        # Each entry of `down` / `up` is one step: its output is (or consumes) one skip.
        self.down = nn.ModuleList()
        for level, out_ch in enumerate(chans):
            for _ in range(blocks[level]):
                step = [res_block(ch, out_ch)]
                ch = out_ch
                if res in cfg.attention_resolutions:
                    step += attention(ch)
                self.down.append(nn.ModuleList(step))
                skip_chs.append(ch)
            if level < len(chans) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, ch)]))
                skip_chs.append(ch)
                res //= 2

        self.middle = nn.ModuleList([res_block(ch, ch), *attention(ch), res_block(ch, ch)])

        self.up = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(chans))):
            for i in range(blocks[level] + 1):
                step = [res_block(ch + skip_chs.pop(), out_ch)]
                ch = out_ch
                if res in cfg.attention_resolutions:
                    step += attention(ch)
                if level > 0 and i == blocks[level]:
                    step.append(Upsample(ch, ch))
                    res *= 2
                self.up.append(nn.ModuleList(step))
        self.out = OutputHead(ch, cfg.out_channels, groups)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, text_emb: torch.Tensor,
                text_mask: torch.Tensor, lowres: Optional[torch.Tensor] = None,
                lowres_noise_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Denoiser output (B, 3, H, W) in the dtype of `x`.

        Pass the noise levels in float32 even for a bf16 network: their sinusoidal features
        reach frequency 1000, finer than bf16 resolves.
        """
        if lowres is not None or lowres_noise_cond is not None:
            raise ValueError("the base UNet takes no low-res conditioning")
        text_mask = text_mask.bool()
        emb, text = self.cond(noise_cond, text_emb, text_mask)  # (B, E), (B, L, cond_dim)

        def run(step: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            for block in step:
                h = block(h, emb, text, text_mask)
            return h

        h = self.input(x.to(self.input.weight.dtype))  # (B, C0, H, W)
        skips = [h]
        for step in self.down:
            h = run(step, h)
            skips.append(h)
        h = run(self.middle, h)
        for step in self.up:
            h = run(step, torch.cat([h, skips.pop()], dim=1))
        return self.out(h).to(x.dtype)
