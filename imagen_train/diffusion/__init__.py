"""Diffusion: schedules, preconditioning, losses, samplers, guidance and noise augmentation.

Nothing here knows about devices, distribution or files; the network is any callable with the
signature of CONTRACTS.md.
"""

from .augment import NoiseConditioningAugmentation
from .caller import NetworkCaller, as_caller
from .diffusion import Diffusion, SampleResult, build_diffusion
from .guidance import ClassifierFreeGuidance, Thresholded, dynamic_threshold, static_threshold, wrap_denoiser
from .losses import ContinuousLoss, EDMLoss, drop_text, ve_noise, vp_noise
from .precond import (EDMPrecond, VPPrecond, eps_from_v, eps_from_x0, prediction_target, prediction_to_x0,
                      v_from_x0_eps, x0_from_eps, x0_from_v)
from .samplers import (SAMPLERS, SamplerOutput, expected_nfe, final_denoise_average, sample_ddim, sample_ddpm,
                       sample_dpmpp_2m, sample_edm, sample_heun)
from .schedules import (LogSNRSchedule, cosine_log_snr, karras_sigmas, linear_log_snr, log_snr_from_sigma,
                        sigma_from_log_snr, time_uniform_sigmas, vp_alpha_sigma, vp_from_sigma)

__all__ = [
    "build_diffusion", "Diffusion", "SampleResult", "NetworkCaller", "as_caller",
    "EDMPrecond", "VPPrecond", "EDMLoss", "ContinuousLoss", "drop_text", "vp_noise", "ve_noise",
    "x0_from_eps", "eps_from_x0", "v_from_x0_eps", "x0_from_v", "eps_from_v", "prediction_to_x0",
    "prediction_target", "ClassifierFreeGuidance", "Thresholded", "dynamic_threshold", "static_threshold",
    "wrap_denoiser", "NoiseConditioningAugmentation", "SAMPLERS", "SamplerOutput", "expected_nfe",
    "final_denoise_average",
    "sample_ddim", "sample_ddpm", "sample_edm", "sample_heun", "sample_dpmpp_2m", "LogSNRSchedule",
    "cosine_log_snr", "linear_log_snr", "karras_sigmas", "time_uniform_sigmas", "vp_alpha_sigma",
    "vp_from_sigma", "sigma_from_log_snr", "log_snr_from_sigma",
]
