"""Training losses: small callables (NVlabs/edm `loss.py` style), plus the forward process.

Each loss is called as loss(net, images, text_emb=..., text_mask=..., [lowres=..., lowres_noise_cond=...])
and returns the per-sample loss (B,) in float32. Noise comes from torch's global RNG.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .precond import EDMPrecond, VPPrecond, prediction_target
from .schedules import vp_alpha_sigma


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def drop_text(text_emb: Tensor, cond_drop_prob: float) -> Tensor:
    """Classifier-free guidance dropout: zero each sample's whole embedding with probability p.

    The mask is left alone (the reference keeps it; the unconditional branch at sampling matches).
    """
    if cond_drop_prob <= 0:
        return text_emb
    drop = torch.rand(text_emb.shape[0], device=text_emb.device) < cond_drop_prob  # (B,)
    return text_emb.masked_fill(_bcast(drop, text_emb), 0.0)


def vp_noise(x0: Tensor, log_snr: Tensor, eps: Tensor) -> Tensor:
    """Forward process of the continuous VP model: x_t = alpha x0 + sigma eps at log_snr (B,)."""
    alpha, sigma = (_bcast(c, x0) for c in vp_alpha_sigma(log_snr))
    return alpha * x0 + sigma * eps


def ve_noise(x0: Tensor, sigma: Tensor, n: Tensor) -> Tensor:
    """Forward process of EDM: x = x0 + sigma n at sigma (B,)."""
    return x0 + _bcast(sigma, x0) * n


class EDMLoss:
    """Karras et al. 2022, eq. 8 and table 1: ln(sigma) ~ N(P_mean, P_std^2),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, L2 on the denoiser's x0."""

    def __init__(self, precond: EDMPrecond, p_mean: float = -1.2, p_std: float = 1.2):
        self.precond, self.p_mean, self.p_std = precond, p_mean, p_std

    def __call__(self, net: Callable, images: Tensor, **cond) -> Tensor:
        images = images.float()
        sigma = (torch.randn(images.shape[0], device=images.device) * self.p_std + self.p_mean).exp()  # (B,)
        sd = self.precond.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        noisy = ve_noise(images, sigma, torch.randn_like(images))
        denoised = self.precond.denoise(net, noisy, sigma, **cond)
        return weight * _per_sample_mean((denoised - images) ** 2)


class ContinuousLoss:
    """Imagen's continuous-time loss: t ~ U(0, 1), MSE between the network output and the
    eps / v / x0 target (Kingma et al. 2021; Salimans & Ho 2022 for v)."""

    def __init__(self, precond: VPPrecond):
        self.precond = precond

    def __call__(self, net: Callable, images: Tensor, **cond) -> Tensor:
        images = images.float()
        t = torch.rand(images.shape[0], device=images.device)  # (B,)
        log_snr = self.precond.schedule(t)
        eps = torch.randn_like(images)
        x_t = vp_noise(images, log_snr, eps)
        alpha, sigma = (_bcast(c, images) for c in vp_alpha_sigma(log_snr))
        target = prediction_target(self.precond.prediction, images, eps, alpha, sigma)
        pred = self.precond.predict(net, x_t, log_snr, **cond)
        return _per_sample_mean((pred - target) ** 2)
