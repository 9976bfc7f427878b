"""The peer network of `bench/train_step.py --peer`: diffusers' UNet2DConditionModel set up like
DeepFloyd IF's stage-I UNets, sized to the parameter count of our base network.

IF's stage I, as diffusers' conversion script (scripts/convert_if.py) configures it: ResNet
blocks with scale-shift time conditioning that also do the down/up sampling
(ResnetDownsampleBlock2D / ResnetUpsampleBlock2D), GroupNorm, GELU, SimpleCrossAttn blocks
(image self-attention whose keys/values also hold the projected text tokens, like our "fused"
attention) at the attention resolutions and in the middle block, the T5 embeddings projected to
`cross_attention_dim` (`encoder_hid_proj`), and an attention-pooled text vector added to the time
embedding (`addition_embed_type="text"`, heads 64 wide).

Taken from our config so both networks see the same problem: resolution, channel multipliers
(an attention level's width rounded to whole heads, see `level_widths`), attention resolutions,
head width, text width (`encoder_hid_dim`), text token width
(`cross_attention_dim` = our `cond_dim`) and GroupNorm groups. Changed from IF: 3 output
channels (IF's 6 include a learned variance that the EDM loss does not train). Chosen to match
our parameter count: the base width (a multiple of the GroupNorm groups near ours) and the
ResNet blocks per level (IF has 3 everywhere; here each level gets k or k + 1).

Installed for the benchmark only: `pip install -c constraints.txt -r bench/requirements.txt`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from imagen_train.config import Config

IF_LAYERS_PER_BLOCK = 3
IF_POOL_HEAD_WIDTH = 64  # IF pools its 4096-wide T5 tokens with 64 heads
CLOSE = 0.02  # parameter counts this close to ours count as matched when choosing the layout
MAX_ROUNDING = 0.1  # an attention level's width may move this far (relative) to hold whole heads


def if_unet_kwargs(cfg: Config, model_channels: int, layers_per_block: list[int]) -> dict[str, Any]:
    """UNet2DConditionModel arguments of an IF stage-I network at `model_channels` and depth."""
    m, res = cfg.model, cfg.train_resolution
    widths = level_widths(cfg, model_channels)
    if widths is None:
        raise ValueError(f"model_channels={model_channels}: an attention level cannot hold whole "
                         f"{m.num_head_channels}-channel heads within {MAX_ROUNDING:.0%} of its width")
    attn = _attention_levels(cfg)
    return dict(
        sample_size=res, in_channels=m.in_channels, out_channels=m.out_channels,
        block_out_channels=widths,
        layers_per_block=list(layers_per_block),
        down_block_types=["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        up_block_types=["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=m.cond_dim, encoder_hid_dim=cfg.text.embed_dim, encoder_hid_dim_type="text_proj",
        attention_head_dim=m.num_head_channels, cross_attention_norm="group_norm", norm_num_groups=m.num_groups,
        addition_embed_type="text",
        addition_embed_type_num_heads=max(1, cfg.text.embed_dim // IF_POOL_HEAD_WIDTH),
        act_fn="gelu", resnet_time_scale_shift="scale_shift", upcast_attention=False)


def _attention_levels(cfg: Config) -> list[bool]:
    """Per level, whether it holds attention at our attention resolutions."""
    m = cfg.model
    return [cfg.train_resolution // 2**level in m.attention_resolutions for level in range(len(m.channel_mult))]


def level_widths(cfg: Config, model_channels: int) -> Optional[list[int]]:
    """The peer's channels per level: `model_channels` times our multipliers, where a level attends
    rounded to the nearest whole number of heads (halves up) that the GroupNorm groups also divide;
    None when that moves a width by more than MAX_ROUNDING (the multipliers would no longer be ours).

    The lowest level counts as attending: UNetMidBlock2DSimpleCrossAttn always has attention.
    diffusers' SimpleCrossAttn blocks take `channels // attention_head_dim` heads and reshape to
    heads x head width, so a width that is not a multiple of the head width (672 channels of
    64-wide heads at base64-500m) builds, and counts its parameters, but fails in the forward.
    """
    m = cfg.model
    attn = _attention_levels(cfg)
    attn[-1] = True
    step = math.lcm(m.num_head_channels, m.num_groups)
    out = []
    for mult, attends in zip(m.channel_mult, attn):
        width = model_channels * mult
        rounded = max(step, step * math.floor(width / step + 0.5)) if attends else width
        if abs(rounded - width) > MAX_ROUNDING * width:
            return None
        out.append(rounded)
    return out


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
    """Every per-level mix of k and k + 1 blocks, except k and k + 1 everywhere."""
    return [list(mix) for mix in itertools.product((k, k + 1), repeat=levels) if len(set(mix)) == 2]


def match_peer(cfg: Config, target_params: int) -> tuple[dict[str, Any], int]:
    """IF stage-I arguments whose parameter count is closest to `target_params`, and that count.

    Widths: multiples of the GroupNorm groups from half to twice our model_channels, the
    attention levels' rounded to whole heads (`level_widths`). Depths: k blocks per level
    (k = 1..5), then every mix of k and k + 1 blocks per level around the target. Among layouts
    within 2 % of the target, the one closest to IF's 3 blocks per level wins, then the one
    closest to our width.
    """
    m = cfg.model
    levels = len(m.channel_mult)
    lo, hi = max(m.num_groups, m.model_channels // 2), 2 * m.model_channels
    widths = [c for c in range(m.num_groups, hi + 1, m.num_groups)
              if c >= lo and level_widths(cfg, c) is not None]
    if not widths:
        raise ValueError(f"no IF-style peer width fits model_channels={m.model_channels}, "
                         f"num_groups={m.num_groups}, num_head_channels={m.num_head_channels}")
    best: Optional[tuple[tuple, dict[str, Any], int]] = None

    def dev(depth: list[int]) -> int:
        return sum(abs(d - IF_LAYERS_PER_BLOCK) for d in depth)

    def beaten(width: int, depth_dev: int) -> bool:
        """Whether a layout of this width and depth cannot beat the best one so far, whatever its count."""
        return (best is not None and not best[0][0]
                and (depth_dev, abs(width - m.model_channels)) > best[0][1:3])

    def consider(kwargs: dict[str, Any]) -> Optional[int]:
        nonlocal best
        count = _count(kwargs)
        if count is None:
            return None
        # Within CLOSE of the target, the most IF-like depth, then our width, then the closest count;
        # else the closest count.
        off = abs(count - target_params) / target_params
        key = (off > CLOSE, dev(kwargs["layers_per_block"]) if off <= CLOSE else 0,
               abs(kwargs["block_out_channels"][0] - m.model_channels) if off <= CLOSE else 0, off)
        if best is None or key < best[0]:
            best = (key, kwargs, count)
        return count

    # Our width first, then outwards: once a layout is matched, the layouts that cannot beat it
    # (more blocks off IF's 3 at a width no closer to ours) are not built.
    for width in sorted(widths, key=lambda c: (abs(c - m.model_channels), c)):
        if beaten(width, 0):
            continue
        counts = {k: consider(if_unet_kwargs(cfg, width, [k] * levels)) for k in range(1, 6)}
        for k in range(1, 5):
            a, b = counts[k], counts[k + 1]
            if a is not None and b is not None and a < target_params < b:
                for depth in _depths(levels, k):
                    if not beaten(width, dev(depth)):
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
