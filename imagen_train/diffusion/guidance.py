"""Wrappers around a denoiser: classifier-free guidance and x0 thresholding.

Both take a denoiser D(x, sigma, **extra_args) -> x0 and return one, so every sampler gets them
without knowing they exist. Order at sampling: threshold(guide(precond(net))), as in Imagen
(the guided x0 is what gets thresholded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .precond import Denoiser

THRESHOLDING = ("dynamic", "static", "none")


class ClassifierFreeGuidance:
    """Ho & Salimans 2022: D = D_uncond + w (D_cond - D_uncond), both passes in one forward.

    The unconditional branch sees all-zero text embeddings with the same mask, as at training
    (losses.drop_text). Guiding x0 is the same as guiding eps: at fixed x and sigma, x0 is affine
    in eps. The network runs once per call on a batch of 2B: [conditional; unconditional].
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float):
        self.denoiser, self.guidance_scale = denoiser, guidance_scale

    def __call__(self, x: Tensor, sigma: Tensor, text_emb: Tensor, text_mask: Tensor, **cond) -> Tensor:
        double = lambda v: torch.cat([v, v]) if isinstance(v, Tensor) else v  # noqa: E731
        denoised = self.denoiser(
            double(x), double(sigma),
            text_emb=torch.cat([text_emb, torch.zeros_like(text_emb)]),  # (2B, L, D)
            text_mask=double(text_mask),
            **{k: double(v) for k, v in cond.items()})
        d_cond, d_uncond = denoised.chunk(2)
        return d_uncond + self.guidance_scale * (d_cond - d_uncond)


def batch_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile of x (B, N) with linear interpolation, like torch.quantile(dim=1).

    torch.quantile refuses inputs over 2^24 elements (a batch of 1024 px images); kthvalue does not.
    """
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = x.kthvalue(lo + 1, dim=1).values
    v_hi = x.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def dynamic_threshold(x0: Tensor, quantile: float = 0.995) -> Tensor:
    """Imagen (Saharia et al. 2022) section 2.3: s = max(1, quantile(|x0|, q)) per sample,
    x0 = clamp(x0, -s, s) / s. Predictions already in [-1, 1] are returned unchanged."""
    flat = x0.detach().float().abs().flatten(1)  # (B, C*H*W)
    s = batch_quantile(flat, quantile).clamp_min(1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def static_threshold(x0: Tensor) -> Tensor:
    """Clamp x0 to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


class Thresholded:
    """Apply static or dynamic thresholding to a denoiser's x0 prediction."""

    def __init__(self, denoiser: Denoiser, mode: str = "dynamic", quantile: float = 0.995):
        if mode not in THRESHOLDING:
            raise ValueError(f"unknown thresholding {mode!r}; expected one of {THRESHOLDING}")
        self.denoiser, self.mode, self.quantile = denoiser, mode, quantile

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args) -> Tensor:
        x0 = self.denoiser(x, sigma, **extra_args)
        if self.mode == "dynamic":
            return dynamic_threshold(x0, self.quantile)
        if self.mode == "static":
            return static_threshold(x0)
        return x0


def wrap_denoiser(denoiser: Denoiser, guidance_scale: float = 1.0, thresholding: str = "none",
                  quantile: float = 0.995) -> Denoiser:
    """Guidance (skipped at scale 1, where it is the identity) then thresholding (skipped at 'none')."""
    if guidance_scale != 1.0:
        denoiser = ClassifierFreeGuidance(denoiser, guidance_scale)
    if thresholding != "none":
        denoiser = Thresholded(denoiser, thresholding, quantile)
    return denoiser


def guidance_batch_factor(guidance_scale: float) -> int:
    """How many images the network sees per output image in one call (2 when guided)."""
    return 1 if guidance_scale == 1.0 else 2


__all__ = ["ClassifierFreeGuidance", "Thresholded", "dynamic_threshold", "static_threshold",
           "batch_quantile", "wrap_denoiser", "guidance_batch_factor", "THRESHOLDING"]
