"""Noise-conditioning augmentation of the SR stages' low-res image (Imagen, section 2.5).

The low-res image is corrupted by the diffusion's own forward process at an augmentation level,
and the network is told the level as `lowres_noise_cond`, on the same scale as `noise_cond`.
The corruption is variance-preserving in both formulations, so the conditioning image stays
in roughly [-1, 1]:  lowres_aug = alpha lowres + sigma_vp n,  alpha = 1 / sqrt(1 + sigma^2),
sigma_vp = sigma alpha, for the level's VE sigma.

Level -> sigma:
- continuous: the level is a diffusion time t_aug, sigma = exp(-log_snr(t_aug) / 2), and
  lowres_noise_cond = log_snr(t_aug) / 8, exactly as for the main input;
- EDM: the level runs along the EDM sampling grid (Karras et al. 2022, eq. 5),
  sigma = (sigma_min^(1/rho) + level (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, so level 0
  is sigma_min = 0.002 (NeMo's sampling default) and level 1 is sigma_max = 80 (0.5 gives 2.5);
  lowres_noise_cond = ln(sigma) / 4, as c_noise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .schedules import vp_from_sigma


class NoiseConditioningAugmentation:
    """Corrupt a low-res image at a level and report the level to the network."""

    def __init__(self, level_to_sigma: Callable[[Tensor], Tensor], noise_cond: Callable[[Tensor], Tensor],
                 max_level: float):
        self.level_to_sigma, self.noise_cond, self.max_level = level_to_sigma, noise_cond, max_level

    def corrupt(self, lowres: Tensor, level: Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(lowres_aug (B, C, h, w), lowres_noise_cond (B,)) for per-sample levels (B,) in [0, 1]."""
        sigma = self.level_to_sigma(level.float())  # (B,)
        alpha, sigma_vp = (v.reshape(-1, *([1] * (lowres.ndim - 1))) for v in vp_from_sigma(sigma))
        noise = torch.randn(lowres.shape, generator=generator, device=lowres.device, dtype=torch.float32)
        lowres_aug = alpha * lowres.float() + sigma_vp * noise
        return lowres_aug, self.noise_cond(sigma)

    def random(self, lowres: Tensor) -> tuple[Tensor, Tensor]:
        """Training: a level drawn per sample from U(0, max_level) with the global RNG."""
        level = torch.rand(lowres.shape[0], device=lowres.device) * self.max_level
        return self.corrupt(lowres, level)
