"""Masked attention layers: fused text/self attention, self and cross attention, text pooling.

All use `F.scaled_dot_product_attention` with a boolean mask (True = may be attended). No query
row is ever fully masked: image tokens are always attendable in fused attention, and
cross-attention and pooling prepend a learned null key/value that is always attendable, so a
sample whose text is all padding (e.g. classifier-free-guidance drop) stays finite.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from imagen_train.models.layers import GroupNorm32, LayerNorm32, zero_module


def num_heads(channels: int, head_channels: int) -> int:
    """Heads of `head_channels` each; error if they do not divide `channels`."""
    if channels % head_channels:
        raise ValueError(f"attention over {channels} channels: num_head_channels={head_channels} "
                         "must divide it")
    return channels // head_channels


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention: q (B, N, C), k/v (B, S, C), mask (B, S) bool -> (B, N, C)."""
    b, n, c = q.shape
    q = q.view(b, n, heads, c // heads).transpose(1, 2)  # (B, h, N, d)
    k = k.view(b, -1, heads, c // heads).transpose(1, 2)  # (B, h, S, d)
    v = v.view(b, -1, heads, c // heads).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, c)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


def _image(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(like.shape)  # (B, HW, C) -> (B, C, H, W)


class FusedAttention(nn.Module):
    """Image self-attention whose keys/values also hold the projected text tokens (Imagen "fused").

    One masked softmax over [image tokens; text tokens]; padding text tokens are masked out.
    """

    def __init__(self, channels: int, cond_dim: int, head_channels: int, num_groups: int):
        super().__init__()
        self.heads = num_heads(channels, head_channels)
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.text_norm = LayerNorm32(cond_dim)
        self.text_kv = nn.Linear(cond_dim, 2 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, emb, text, text_mask):
        q, k, v = self.qkv(_tokens(self.norm(x))).chunk(3, dim=-1)  # (B, HW, C) each
        text_k, text_v = self.text_kv(self.text_norm(text)).chunk(2, dim=-1)  # (B, L, C) each
        image_mask = text_mask.new_ones(x.shape[0], q.shape[1])
        mask = torch.cat([image_mask, text_mask], dim=1)  # (B, HW + L)
        out = attend(q, torch.cat([k, text_k], 1), torch.cat([v, text_v], 1), self.heads, mask)
        return x + _image(self.proj(out), x)


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over the image tokens."""

    def __init__(self, channels: int, head_channels: int, num_groups: int):
        super().__init__()
        self.heads = num_heads(channels, head_channels)
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, emb=None, text=None, text_mask=None):
        q, k, v = self.qkv(_tokens(self.norm(x))).chunk(3, dim=-1)  # (B, HW, C) each
        return x + _image(self.proj(attend(q, k, v, self.heads)), x)


class CrossAttention(nn.Module):
    """Image tokens attend to [null; text tokens], padding masked; the null key/value is learned."""

    def __init__(self, channels: int, cond_dim: int, head_channels: int, num_groups: int):
        super().__init__()
        self.heads = num_heads(channels, head_channels)
        self.norm = GroupNorm32(num_groups, channels)
        self.q = nn.Linear(channels, channels)
        self.text_norm = LayerNorm32(cond_dim)
        self.text_kv = nn.Linear(cond_dim, 2 * channels)
        self.null_kv = nn.Parameter(torch.zeros(2, channels))
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, emb, text, text_mask):
        b = x.shape[0]
        q = self.q(_tokens(self.norm(x)))  # (B, HW, C)
        text_k, text_v = self.text_kv(self.text_norm(text)).chunk(2, dim=-1)  # (B, L, C) each
        null_k, null_v = self.null_kv.to(q.dtype)[:, None, None, :].expand(2, b, 1, -1)  # (B, 1, C) each
        mask = torch.cat([text_mask.new_ones(b, 1), text_mask], dim=1)  # (B, 1 + L)
        out = attend(q, torch.cat([null_k, text_k], 1), torch.cat([null_v, text_v], 1), self.heads, mask)
        return x + _image(self.proj(out), x)


class AttentionPool(nn.Module):
    """Pool text tokens (B, L, D) into one vector (B, D), padding excluded (CLIP-style pooling).

    The query is the masked mean token plus a learned vector; keys/values are [null; tokens].
    """

    def __init__(self, dim: int, head_channels: int):
        super().__init__()
        self.heads = num_heads(dim, head_channels) if dim % head_channels == 0 else 1
        self.norm = LayerNorm32(dim)
        self.query = nn.Parameter(torch.zeros(dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.null_kv = nn.Parameter(torch.zeros(2, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        b = text.shape[0]
        h = self.norm(text)  # (B, L, D)
        weights = text_mask[..., None].to(h.dtype)  # (B, L, 1)
        mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        q = self.q(mean + self.query.to(h.dtype))[:, None, :]  # (B, 1, D)
        k, v = self.kv(h).chunk(2, dim=-1)  # (B, L, D) each
        null_k, null_v = self.null_kv.to(k.dtype)[:, None, None, :].expand(2, b, 1, -1)
        mask = torch.cat([text_mask.new_ones(b, 1), text_mask], dim=1)  # (B, 1 + L)
        out = attend(q, torch.cat([null_k, k], 1), torch.cat([null_v, v], 1), self.heads, mask)
        return self.proj(out[:, 0])  # (B, D)


def text_attention_blocks(kind: str, channels: int, cond_dim: int, head_channels: int, num_groups: int,
                          self_attention: bool) -> list[nn.Module]:
    """The attention layers of one attention level: fused, or [self-attention,] cross-attention."""
    if kind == "fused":  # image tokens always attend each other here: `self_attention` is moot
        return [FusedAttention(channels, cond_dim, head_channels, num_groups)]
    if kind != "cross":
        raise ValueError(f"unknown attention_type {kind!r}; expected 'fused' or 'cross'")
    blocks: list[nn.Module] = [SelfAttention(channels, head_channels, num_groups)] if self_attention else []
    return blocks + [CrossAttention(channels, cond_dim, head_channels, num_groups)]
