"""The peer network of `bench/train_step.py --peer`: diffusers' UNet2DConditionModel set up like
DeepFloyd IF's stage-I UNets, sized to the parameter count of our base network.

IF's stage I, as diffusers' conversion script (scripts/convert_if.py) configures it: ResNet
blocks with scale-shift time conditioning that also do the down/up sampling
(ResnetDownsampleBlock2D / ResnetUpsampleBlock2D), GroupNorm, GELU, SimpleCrossAttn blocks
(image self-attention whose keys/values also hold the projected text tokens, like our "fused"
attention) at the attention resolutions and in the middle block, the T5 embeddings projected to
`cross_attention_dim` (`encoder_hid_proj`), and an attention-pooled text vector added to the time
embedding (`addition_embed_type="text"`, heads 64 wide).

Taken from our config so both networks see the same problem: resolution, channel multipliers,
attention resolutions, head width, text width (`encoder_hid_dim`), text token width
(`cross_attention_dim` = our `cond_dim`) and GroupNorm groups. Changed from IF: 3 output
channels (IF's 6 include a learned variance that the EDM loss does not train). Chosen to match
our parameter count: the base width (a multiple of the GroupNorm groups near ours) and the
ResNet blocks per level (IF has 3 everywhere; here each level gets k or k + 1).

Installed for the benchmark only: `pip install -c constraints.txt -r bench/requirements.txt`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from imagen_train.config import Config

IF_LAYERS_PER_BLOCK = 3
IF_POOL_HEAD_WIDTH = 64  # IF pools its 4096-wide T5 tokens with 64 heads
CLOSE = 0.02  # parameter counts this close to ours count as matched when choosing the layout


def if_unet_kwargs(cfg: Config, model_channels: int, layers_per_block: list[int]) -> dict[str, Any]:
    """UNet2DConditionModel arguments of an IF stage-I network at `model_channels` and depth."""
    m, res = cfg.model, cfg.train_resolution
    level_res = [res // 2**level for level in range(len(m.channel_mult))]
    attn = [r in m.attention_resolutions for r in level_res]
    return dict(
        sample_size=res, in_channels=m.in_channels, out_channels=m.out_channels,
        block_out_channels=[model_channels * mult for mult in m.channel_mult],
        layers_per_block=list(layers_per_block),
        down_block_types=["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        up_block_types=["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=m.cond_dim, encoder_hid_dim=cfg.text.embed_dim, encoder_hid_dim_type="text_proj",
        attention_head_dim=m.num_head_channels, cross_attention_norm="group_norm", norm_num_groups=m.num_groups,
        addition_embed_type="text",
        addition_embed_type_num_heads=max(1, cfg.text.embed_dim // IF_POOL_HEAD_WIDTH),
        act_fn="gelu", resnet_time_scale_shift="scale_shift", upcast_attention=False)


def _count(kwargs: dict[str, Any]) -> Optional[int]:
    """Parameters of the network `kwargs` describe (built on the meta device), None if invalid."""
    from diffusers import UNet2DConditionModel
    try:
        with torch.device("meta"):
            net = UNet2DConditionModel(**kwargs)
    except (ValueError, ZeroDivisionError, AssertionError):
        return None
    return sum(p.numel() for p in net.parameters())


def _depths(levels: int, k: int) -> list[list[int]]:
    """Per-level block counts between k everywhere and k + 1 everywhere, one level at a time."""
    out = []
    for j in range(1, levels):
        out.append([k + 1] * j + [k] * (levels - j))  # extra blocks at the high-resolution end
        out.append([k] * j + [k + 1] * (levels - j))  # ... or at the low-resolution end
    return out


def match_peer(cfg: Config, target_params: int) -> tuple[dict[str, Any], int]:
    """IF stage-I arguments whose parameter count is closest to `target_params`, and that count.

    Widths: multiples of the GroupNorm groups from half to twice our model_channels, wide enough
    for one attention head at every attention level. Depths: k blocks per level (k = 1..5), then
    mixes of k and k + 1 blocks around the target. Among layouts within 2 % of the target, the
    one closest to IF's 3 blocks per level wins, then the one closest to our width.
    """
    m = cfg.model
    levels = len(m.channel_mult)
    attn_mults = [mult for level, mult in enumerate(m.channel_mult)
                  if cfg.train_resolution // 2**level in m.attention_resolutions] or [max(m.channel_mult)]
    lo, hi = max(m.num_groups, m.model_channels // 2), 2 * m.model_channels
    widths = [c for c in range(m.num_groups, hi + 1, m.num_groups)
              if c >= lo and c * min(attn_mults) >= m.num_head_channels]
    if not widths:
        raise ValueError(f"no IF-style peer width fits model_channels={m.model_channels}, "
                         f"num_groups={m.num_groups}, num_head_channels={m.num_head_channels}")
    best: Optional[tuple[tuple, dict[str, Any], int]] = None

    def consider(kwargs: dict[str, Any]) -> Optional[int]:
        nonlocal best
        count = _count(kwargs)
        if count is None:
            return None
        depth = kwargs["layers_per_block"]
        # Within CLOSE of the target, the most IF-like depth, then our width, then the closest count;
        # else the closest count.
        off = abs(count - target_params) / target_params
        key = (off > CLOSE, sum(abs(d - IF_LAYERS_PER_BLOCK) for d in depth) if off <= CLOSE else 0,
               abs(kwargs["block_out_channels"][0] - m.model_channels) if off <= CLOSE else 0, off)
        if best is None or key < best[0]:
            best = (key, kwargs, count)
        return count

    for width in widths:
        counts = {k: consider(if_unet_kwargs(cfg, width, [k] * levels)) for k in range(1, 6)}
        for k in range(1, 5):
            a, b = counts[k], counts[k + 1]
            if a is not None and b is not None and a < target_params < b:
                for depth in _depths(levels, k):
                    consider(if_unet_kwargs(cfg, width, depth))
    assert best is not None
    return best[1], best[2]


def build_peer(kwargs: dict[str, Any]) -> nn.Module:
    """The peer network (random weights) from `if_unet_kwargs`-style arguments."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # its advice on from_pretrained dtypes does not apply here
    return UNet2DConditionModel(**kwargs)


def peer_forward(unet: nn.Module) -> Callable:
    """The peer under our network signature (x, noise_cond, text_emb, text_mask, ...) -> (B, 3, H, W).

    The padding mask is passed (diffusers turns it into an additive bias over the text keys);
    the noise level goes in as the timestep, whose sinusoidal embedding takes any float.
    """
    def forward(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        if lowres is not None:
            raise ValueError("the IF stage-I peer has no low-res conditioning: use a base64 config")
        return unet(x, noise_cond, encoder_hidden_states=text_emb, encoder_attention_mask=text_mask,
                    return_dict=False)[0]
    return forward


def set_peer_recompute(unet: nn.Module, enabled: bool) -> None:
    """Turn diffusers' activation checkpointing on or off."""
    if enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
