"""The config sections of the diffusion process and of sampling: the forward process and its
training noise levels, noise-conditioning augmentation, and one stage's sampler settings.

Re-exported by `imagen_train.schema` (and `imagen_train.config`); no YAML here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from imagen_train.config_errors import check


@dataclass
class NoiseAugConfig:
    """Noise-conditioning augmentation of the SR stages' low-res image (paper section 2.5)."""

    # Training: the augmentation level is drawn uniformly from [0, max_level] as a fraction of
    # the diffusion time (continuous) or mapped to sigma (EDM, see diffusion.augment).
    # At sampling the level is each stage's `SamplerConfig.noise_aug_level`.
    max_level: float = 0.5

    def __post_init__(self) -> None:
        check(0.0 <= self.max_level <= 1.0, "max_level", "a float in [0, 1]", self.max_level)


@dataclass
class DiffusionConfig:
    """Parameterization, schedule and loss (continuous-time Gaussian diffusion or EDM)."""

    # "edm" (Karras et al. 2022) or "continuous" (continuous-time Gaussian diffusion, log-SNR schedule).
    formulation: Literal["edm", "continuous"] = "edm"
    # Continuous-time model.
    schedule: Literal["cosine", "linear"] = "cosine"
    # Offset s of the cosine schedule (Nichol & Dhariwal 2021).
    cosine_s: float = 0.008
    # What the continuous-time network predicts: the noise, v, or the clean image.
    prediction: Literal["eps", "v", "x0"] = "eps"
    # EDM (Karras et al. 2022, table 1).
    sigma_data: float = 0.5
    # Training noise levels: ln(sigma) ~ N(p_mean, p_std^2).
    p_mean: float = -1.2
    p_std: float = 1.2
    # sigma_min, sigma_max: the noise range the samplers cover.
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # Classifier-free guidance: probability of dropping a sample's text at training.
    cond_drop_prob: float = 0.1
    noise_aug: NoiseAugConfig = field(default_factory=NoiseAugConfig)

    def __post_init__(self) -> None:
        check(0.0 <= self.cond_drop_prob <= 1.0, "cond_drop_prob", "a float in [0, 1]", self.cond_drop_prob)
        check(self.sigma_data > 0, "sigma_data", "a positive float", self.sigma_data)
        check(self.p_std > 0, "p_std", "a positive float", self.p_std)
        check(0 < self.sigma_min < self.sigma_max, "sigma_min",
               f"a positive float below sigma_max ({self.sigma_max})", self.sigma_min)
        check(0 < self.cosine_s < 1, "cosine_s", "a float in (0, 1)", self.cosine_s)


@dataclass
class SamplerConfig:
    """One stage's sampler settings."""

    # The sampler (imagen_train/diffusion/samplers.py); EDM Heun is the reference.
    name: Literal["ddpm", "ddim", "edm_heun", "edm_stochastic", "dpmpp_2m"] = "edm_heun"
    # Sampling steps (Heun: 2 * steps - 1 network calls per image).
    steps: int = 30
    # Classifier-free guidance weight (1: conditional prediction only).
    guidance_scale: float = 7.5
    # [sigma_lo, sigma_hi]: guide only at noise levels sigma_lo < sigma <= sigma_hi, elsewhere the
    # conditional prediction alone (Kynkaanniemi et al. 2024). None: guide at every level.
    guidance_interval: Optional[list[float]] = None
    # How the predicted clean image is kept in range: dynamic (Imagen), static clamp to [-1, 1], or none.
    thresholding: Literal["dynamic", "static", "none"] = "dynamic"
    # Dynamic thresholding's percentile of |x0| per sample.
    dynamic_quantile: float = 0.995
    # edm_stochastic: noise added back per step (s_churn) and its scale (s_noise).
    s_churn: float = 0.0
    s_noise: float = 1.0
    # SR stages: noise-augmentation level of the low-res conditioning image.
    noise_aug_level: float = 0.0
    # > 0: the output is the mean of the conditional denoised prediction D(x + sigma n_k, sigma)
    # over `final_denoise_draws` fresh noise fields, taken at this sigma after the sampler ends
    # (samplers.final_denoise_average). 0: the sampler's output as it is.
    final_denoise_sigma: float = 0.0
    # Noise draws the final average takes (with final_denoise_sigma > 0).
    final_denoise_draws: int = 16
    # Take the draws in pairs n, -n (antithetic): the part of the error linear in the noise
    # cancels within each pair instead of shrinking as 1/sqrt(draws). Needs an even draw count.
    final_denoise_antithetic: bool = False

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "a positive int", self.steps)
        check(self.guidance_scale >= 0, "guidance_scale", "a non-negative float", self.guidance_scale)
        if self.guidance_interval is not None:
            interval = self.guidance_interval
            check(isinstance(interval, (list, tuple)) and len(interval) == 2
                  and all(isinstance(v, (int, float)) for v in interval) and 0 <= interval[0] < interval[1],
                  "guidance_interval", "[sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi", interval)
        check(0.5 < self.dynamic_quantile <= 1.0, "dynamic_quantile", "a float in (0.5, 1]",
               self.dynamic_quantile)
        check(0.0 <= self.noise_aug_level <= 1.0, "noise_aug_level", "a float in [0, 1]",
               self.noise_aug_level)
        check(isinstance(self.final_denoise_sigma, (int, float)) and self.final_denoise_sigma >= 0,
              "final_denoise_sigma", "a non-negative float (0: off)", self.final_denoise_sigma)
        check(isinstance(self.final_denoise_draws, int) and self.final_denoise_draws >= 1,
              "final_denoise_draws", "a positive int", self.final_denoise_draws)
        check(isinstance(self.final_denoise_antithetic, bool), "final_denoise_antithetic", "true or false",
              self.final_denoise_antithetic)
        check(not self.final_denoise_antithetic or self.final_denoise_draws % 2 == 0, "final_denoise_draws",
              "an even int with final_denoise_antithetic (the draws come in pairs n, -n)", self.final_denoise_draws)


@dataclass
class CascadeSourceConfig:
    """An earlier stage of the cascade, which draws an SR stage's low-res input at evaluation."""

    path: str = ""  # an export (.safetensors), a checkpoint folder or a checkpoints root
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.path, str) and bool(self.path), "path", "an export or checkpoint path", self.path)
