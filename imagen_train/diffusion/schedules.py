"""Noise levels: continuous-time log-SNR schedules, and the EDM sigma grid.

Every formulation is expressed in the variance-exploding ("sigma") space of Karras et al. 2022:
x = x0 + sigma * n. A variance-preserving (VP) sample x_vp = alpha * x0 + sigma_vp * n is the same
point scaled: x_vp = alpha * x with alpha = 1 / sqrt(1 + sigma^2), sigma = sigma_vp / alpha,
log_snr = log(alpha^2 / sigma_vp^2) = -2 ln(sigma).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The continuous schedules reach log_snr = +-inf at t = 0 (linear) or t = 1 (cosine); clamping
# keeps sigma in [4.5e-5, 2.2e4], wide enough for sampling and finite in float32.
LOG_SNR_MIN, LOG_SNR_MAX = -20.0, 20.0
# The VP SDE's linear beta schedule (Song et al. 2021): beta(t) = beta_min + t (beta_max - beta_min).
LINEAR_BETA_MIN, LINEAR_BETA_MAX = 0.1, 20.0
# Karras et al. 2022, eq. 5: the step-size exponent of the EDM sampling grid.
EDM_RHO = 7.0


def cosine_log_snr(t: Tensor, s: float = 0.008) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021) as log-SNR: alpha = cos(phi), sigma_vp = sin(phi).

    phi = pi/2 (t + s) / (1 + s); log_snr = -2 ln tan(phi). Computed in float64 because
    cos(phi) underflows near t = 1.
    """
    phi = (t.double().clamp(0, 1) + s) / (1 + s) * (math.pi / 2)
    log_snr = 2.0 * (torch.log(torch.cos(phi).clamp_min(1e-300)) - torch.log(torch.sin(phi)))
    return log_snr.clamp(LOG_SNR_MIN, LOG_SNR_MAX).to(t.dtype)


def linear_log_snr(t: Tensor, beta_min: float = LINEAR_BETA_MIN, beta_max: float = LINEAR_BETA_MAX) -> Tensor:
    """VP linear beta schedule as log-SNR: alpha^2 = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))."""
    t64 = t.double().clamp(0, 1)
    integral = beta_min * t64 + 0.5 * (beta_max - beta_min) * t64**2  # -ln(alpha^2)
    log_snr = -torch.log(torch.expm1(integral))  # log(alpha^2 / (1 - alpha^2)); +inf at t = 0
    return log_snr.clamp(LOG_SNR_MIN, LOG_SNR_MAX).to(t.dtype)


class LogSNRSchedule:
    """A continuous-time schedule t in [0, 1] -> log_snr, decreasing in t."""

    def __init__(self, kind: str, cosine_s: float = 0.008):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {kind!r}; expected 'cosine' or 'linear'")
        self.kind, self.cosine_s = kind, cosine_s

    def __call__(self, t: Tensor) -> Tensor:
        """log_snr(t), same shape and dtype as t."""
        if self.kind == "cosine":
            return cosine_log_snr(t, self.cosine_s)
        return linear_log_snr(t)

    def sigma(self, t: Tensor) -> Tensor:
        """The VE sigma at time t."""
        return sigma_from_log_snr(self(t))

    def sigma_range(self) -> tuple[float, float]:
        """(sigma at t = 0, sigma at t = 1): the noise levels the network was trained on."""
        ends = self.sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
        return float(ends[0]), float(ends[1])


def vp_alpha_sigma(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """VP coefficients (alpha, sigma_vp) with alpha^2 + sigma_vp^2 = 1 at this log-SNR."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def sigma_from_log_snr(log_snr: Tensor) -> Tensor:
    """VE sigma = exp(-log_snr / 2)."""
    return torch.exp(-0.5 * log_snr)


def log_snr_from_sigma(sigma: Tensor) -> Tensor:
    """log_snr = -2 ln(sigma)."""
    return -2.0 * torch.log(sigma)


def vp_from_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma_vp) for a VE sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma * alpha."""
    alpha = torch.rsqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def karras_interp(u: Tensor, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> Tensor:
    """Karras et al. 2022, eq. 5, as a map u in [0, 1] -> sigma: u = 0 gives sigma_min, 1 sigma_max."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + u * (hi - lo)) ** rho


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = EDM_RHO,
                  device: torch.device | str | None = None) -> Tensor:
    """The EDM sampling grid: `steps` sigmas from sigma_max down to sigma_min, then 0. (steps + 1,)"""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=torch.float64)
    sigmas = karras_interp(ramp, sigma_min, sigma_max, rho)
    return append_zero(sigmas).float().to(device)


def time_uniform_sigmas(schedule: LogSNRSchedule, steps: int,
                        device: torch.device | str | None = None) -> Tensor:
    """DDPM's grid: sigma(t) at t = 1, 1 - 1/steps, ..., 1/steps, then 0. (steps + 1,)"""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    return append_zero(schedule.sigma(t)).float().to(device)


def append_zero(sigmas: Tensor) -> Tensor:
    """Append a final sigma = 0 (the last step returns the denoiser's x0)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])
