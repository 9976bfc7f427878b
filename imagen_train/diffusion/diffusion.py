"""The diffusion object the trainer and the sampling pipeline use (CONTRACTS.md).

    diffusion = build_diffusion(cfg.diffusion)
    loss = diffusion.training_loss(net, images, text_emb, text_mask, lowres=None)   # (B,)
    result = diffusion.sample(net, shape, text_emb, text_mask, sampler_cfg, lowres=None, generator=None)
    result.images  # (B, 3, H, W), unclamped;  result.nfe  # network forward passes
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..schema import DiffusionConfig, SamplerConfig
from .augment import NoiseConditioningAugmentation
from .guidance import guidance_batch_factor, wrap_denoiser
from .losses import ContinuousLoss, EDMLoss, drop_text
from .precond import Denoiser, EDMPrecond, VPPrecond
from .samplers import SAMPLERS, final_denoise_average
from .schedules import LogSNRSchedule, karras_interp, karras_sigmas, time_uniform_sigmas


@dataclass
class SampleResult:
    """Samples and their cost.

    nfe: network forward passes made (Heun: 2N - 1, others: N), the same with or without guidance
    because the conditional and unconditional passes share one forward; net_batch_factor: images the
    network processed per output image in each pass (2 when guided), so nfe * net_batch_factor is
    the per-image count NeMo reports. final_nfe: the unguided passes (one image each) of the final
    denoising average, when the sampler settings ask for one; not in nfe. before_final: the
    sampler's own output when a final average followed it (None otherwise), to measure what the
    average changed.
    """

    images: Tensor
    nfe: int
    net_batch_factor: int = 1
    final_nfe: int = 0
    before_final: Optional[Tensor] = None


class Diffusion:
    """Continuous-time Gaussian diffusion (Imagen) or EDM, behind one interface."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        if cfg.formulation == "edm":
            self.precond = EDMPrecond(cfg.sigma_data)
            self.loss_fn = EDMLoss(self.precond, cfg.p_mean, cfg.p_std)
            self.sigma_min, self.sigma_max = cfg.sigma_min, cfg.sigma_max
            level_to_sigma = partial(karras_interp, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
        elif cfg.formulation == "continuous":
            self.schedule = LogSNRSchedule(cfg.schedule, cfg.cosine_s)
            self.precond = VPPrecond(self.schedule, cfg.prediction)
            self.loss_fn = ContinuousLoss(self.precond)
            # EDM-style grids stay inside both the configured range and the trained one.
            lo, hi = self.schedule.sigma_range()
            self.sigma_min, self.sigma_max = max(cfg.sigma_min, lo), min(cfg.sigma_max, hi)
            level_to_sigma = self.schedule.sigma
        else:
            raise ValueError(f"unknown formulation {cfg.formulation!r}; expected 'edm' or 'continuous'")
        self.noise_aug = NoiseConditioningAugmentation(level_to_sigma, self.precond.noise_cond,
                                                       cfg.noise_aug.max_level)

    # ------------------------------------------------------------------------------------------
    def denoiser(self, net: Callable) -> Denoiser:
        """The bare denoiser D(x, sigma, text_emb=, text_mask=, [lowres=, lowres_noise_cond=])."""
        return self.precond.bind(net)

    def training_loss(self, net: Callable, images: Tensor, text_emb: Tensor, text_mask: Tensor,
                      lowres: Optional[Tensor] = None) -> Tensor:
        """Per-sample loss (B,) with the text dropped for CFG and, given lowres, noise augmentation."""
        cond = {"text_emb": drop_text(text_emb, self.cfg.cond_drop_prob), "text_mask": text_mask}
        if lowres is not None:
            cond["lowres"], cond["lowres_noise_cond"] = self.noise_aug.random(lowres)
        return self.loss_fn(net, images, **cond)

    def sigmas(self, sampler: str, steps: int, device: torch.device | str | None = None) -> Tensor:
        """The sampling grid (steps + 1,), ending at 0.

        DDPM and DDIM on a continuous model use its native grid, uniform in t; every other case
        uses the EDM grid (rho = 7) over [sigma_min, sigma_max].
        """
        if self.cfg.formulation == "continuous" and sampler in ("ddpm", "ddim"):
            return time_uniform_sigmas(self.schedule, steps, device)
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, device=device)

    def prior_std(self, sigma_max: Tensor) -> Tensor:
        """Std of the initial noise at sigma_max: EDM uses sigma_max (as NVlabs/edm); the VP model's
        prior x_vp ~ N(0, I) is sqrt(1 + sigma_max^2) in VE space."""
        if self.cfg.formulation == "continuous":
            return (1 + sigma_max**2).sqrt()
        return sigma_max

    @torch.no_grad()
    def sample(self, net: Callable, shape: Sequence[int], text_emb: Tensor, text_mask: Tensor,
               sampler_cfg: SamplerConfig, lowres: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> SampleResult:
        """Draw samples of `shape` (B, C, H, W) with the sampler and settings of `sampler_cfg`."""
        if sampler_cfg.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler_cfg.name!r}; expected one of {sorted(SAMPLERS)}")
        device = text_emb.device
        extra_args = {"text_emb": text_emb, "text_mask": text_mask}
        if lowres is not None:
            # Corrupt the low-res image once, then hand the corrupted image to every network call.
            level = torch.full((shape[0],), sampler_cfg.noise_aug_level, device=device)
            extra_args["lowres"], extra_args["lowres_noise_cond"] = self.noise_aug.corrupt(
                lowres.to(device), level, generator)

        bare = self.denoiser(net)
        denoiser = wrap_denoiser(bare, sampler_cfg.guidance_scale,
                                 sampler_cfg.thresholding, sampler_cfg.dynamic_quantile,
                                 tuple(sampler_cfg.guidance_interval) if sampler_cfg.guidance_interval else None)
        sigmas = self.sigmas(sampler_cfg.name, sampler_cfg.steps, device)
        x = torch.randn(tuple(shape), generator=generator, device=device) * self.prior_std(sigmas[0])
        options = {}
        if sampler_cfg.name == "edm_stochastic":
            options = {"s_churn": sampler_cfg.s_churn, "s_noise": sampler_cfg.s_noise}
        out = SAMPLERS[sampler_cfg.name](denoiser, x, sigmas, extra_args=extra_args,
                                         generator=generator, **options)
        samples, final_nfe, before_final = out.samples, 0, None
        if sampler_cfg.final_denoise_sigma > 0:
            before_final = samples
            # The conditional prediction alone: at low noise guidance adds the unconditional
            # prediction's error with a negative weight and changes nothing the prompt decides.
            conditional = wrap_denoiser(bare, 1.0, sampler_cfg.thresholding, sampler_cfg.dynamic_quantile)
            samples, final_nfe = final_denoise_average(conditional, samples, sampler_cfg.final_denoise_sigma,
                                                       sampler_cfg.final_denoise_draws, extra_args, generator,
                                                       antithetic=sampler_cfg.final_denoise_antithetic)
        return SampleResult(samples, out.nfe, guidance_batch_factor(sampler_cfg.guidance_scale), final_nfe,
                            before_final)


def build_diffusion(cfg: DiffusionConfig) -> Diffusion:
    """The Diffusion object for a DiffusionConfig."""
    return Diffusion(cfg)
