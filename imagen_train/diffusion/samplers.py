"""Samplers: pure functions with one signature (k-diffusion style).

    sample_x(denoiser, x, sigmas, extra_args=None, callback=None, generator=None, **options)
        -> SamplerOutput(samples, nfe)

`denoiser(x, sigma (B,), **extra_args)` returns the x0 prediction (guidance and thresholding,
if any, are already wrapped around it, see guidance.py); `x` is the initial noise at sigmas[0]
in VE space (x = x0 + sigma n); `sigmas` (N + 1,) is decreasing and ends with 0, so N steps.
`nfe` counts denoiser calls, i.e. network forward passes (a guided call is one forward on a
doubled batch). `callback` receives a dict {i, x, sigma, sigma_hat, denoised} after each step.

Branches on the noise levels read a host copy of `sigmas` taken once per run: a test on a GPU
tensor (`if sigma_next > 0`, `float(sigma)`) waits for every queued kernel, so the host could not
queue the next network call while the current one runs. The arithmetic stays on the device. The
(B,) noise level handed to the denoiser carries its host value too, as `sigma.host_sigma` (a
float), for wrappers that branch on it (guidance's interval): no step of a sampler reads the
device (tests/test_sampling.py counts the reads).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .precond import Denoiser


class SamplerOutput(NamedTuple):
    """Final samples (x0 at sigma = 0) and the number of network evaluations used."""

    samples: Tensor
    nfe: int


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _full(sigma: Tensor, x: Tensor, host: float) -> Tensor:
    """A scalar sigma as a (B,) tensor (a broadcast view, no kernel) carrying its value on the host,
    `host`, as `host_sigma`."""
    out = sigma.to(x.dtype).expand(x.shape[0])
    out.host_sigma = float(host)
    return out


def _report(callback: Optional[Callable], i: int, x: Tensor, sigma: Tensor, sigma_hat: Tensor,
            denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                eta: float = 0.0) -> SamplerOutput:
    """DDIM (Song et al. 2021, eq. 12) in sigma space; eta = 1 is DDPM's ancestral sampler.

    In VE space the forward chain is x_t = x_s + sqrt(sigma_t^2 - sigma_s^2) z (the VP chain divided
    by alpha_t), so the DDPM posterior q(x_s | x_t, x0) has mean x0 + (sigma_s / sigma_t)^2 (x_t - x0)
    and std sigma_up = sigma_s sqrt(1 - sigma_s^2 / sigma_t^2). DDIM keeps eta * sigma_up of that
    noise fresh and moves the rest along the predicted eps = (x_t - x0) / sigma_t.
    """
    extra_args = extra_args or {}
    nfe = 0
    host = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _full(sigma, x, host[i]), **extra_args)
        nfe += 1
        sigma_up = eta * sigma_next * (1 - (sigma_next / sigma) ** 2).clamp_min(0).sqrt()
        sigma_down = (sigma_next**2 - sigma_up**2).clamp_min(0).sqrt()
        eps = (x - denoised) / sigma
        x = denoised + sigma_down * eps
        if eta * host[i + 1] * math.sqrt(max(0.0, 1 - (host[i + 1] / host[i]) ** 2)) > 0:  # sigma_up > 0
            x = x + sigma_up * _randn_like(x, generator)
        _report(callback, i, x, sigma, sigma, denoised)
    return SamplerOutput(x, nfe)


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None) -> SamplerOutput:
    """DDPM ancestral sampling (Ho et al. 2020): sample the posterior q(x_s | x_t, x0_hat) each step."""
    return sample_ddim(denoiser, x, sigmas, extra_args, callback, generator, eta=1.0)


@torch.no_grad()
def sample_edm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
               callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
               s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
               s_noise: float = 1.0) -> SamplerOutput:
    """Karras et al. 2022, Algorithm 2 (stochastic Heun); with s_churn = 0 it is Algorithm 1.

    NFE = 2N - 1 for N steps: the last step (to sigma = 0) takes no second-order correction.
    """
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    nfe = 0
    host = sigmas.tolist()
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Increase noise temporarily: gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax].
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= host[i] <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * _randn_like(x, generator)
        # Euler step from sigma_hat to sigma_next.
        denoised = denoiser(x, _full(sigma_hat, x, host[i] * (1 + gamma)), **extra_args)
        nfe += 1
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        # Second-order correction unless sigma_next = 0.
        if host[i + 1] > 0:
            denoised_next = denoiser(x_next, _full(sigma_next, x, host[i + 1]), **extra_args)
            nfe += 1
            d_next = (x_next - denoised_next) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
        _report(callback, i, x, sigma, sigma_hat, denoised)
    return SamplerOutput(x, nfe)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None) -> SamplerOutput:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1)."""
    return sample_edm(denoiser, x, sigmas, extra_args, callback, generator, s_churn=0.0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                    callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None) -> SamplerOutput:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = -ln(sigma); NFE = N."""
    extra_args = extra_args or {}
    nfe = 0
    old_denoised: Optional[Tensor] = None
    h_last: Optional[Tensor] = None
    host = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _full(sigma, x, host[i]), **extra_args)
        nfe += 1
        if host[i + 1] == 0:
            x = denoised  # The exact solution's limit: x(0) = x0 prediction.
        else:
            h = sigma.log() - sigma_next.log()  # lambda_next - lambda > 0
            if old_denoised is None:
                d = denoised  # first step: DPM-Solver++(1), i.e. DDIM
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma, denoised)
    return SamplerOutput(x, nfe)


# SamplerConfig.name -> sampler.
SAMPLERS: dict[str, Callable[..., SamplerOutput]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "edm_heun": sample_heun,
    "edm_stochastic": sample_edm,
    "dpmpp_2m": sample_dpmpp_2m,
}


@torch.no_grad()
def final_denoise_average(denoiser: Denoiser, x: Tensor, sigma: float, draws: int,
                          extra_args: Optional[dict] = None,
                          generator: Optional[torch.Generator] = None,
                          antithetic: bool = False) -> SamplerOutput:
    """The mean of D(x + sigma n_k, sigma) over `draws` fresh noise fields n_k (one call each);
    `antithetic`: draws/2 fields, each taken as n and -n.

    Why: a trained denoiser's error is mostly a function of the noise it is handed. On the CPU
    quickstart's 64 px stage the background error of two predictions of the same image under two
    noise draws correlates 0.08-0.12 at sigma 0.1-1, so a sampler's output carries one draw's
    error as per-pixel grain, and the mean over draws keeps only the shared part (docs/training.md,
    "Where the grain comes from"). The result is a Monte Carlo estimate of the posterior mean at
    `sigma`: detail the network cannot tell from noise of that level is averaged away too, so it
    suits flat content and is off by default. In antithetic pairs the error's part that is linear
    in the noise cancels exactly, so only the higher-order part is left to average down.
    """
    extra_args = extra_args or {}
    if antithetic and draws % 2:
        raise ValueError(f"antithetic draws come in pairs: {draws} is odd")
    sigma_b = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    sigma_b.host_sigma = float(sigma)
    total = torch.zeros_like(x)
    for _ in range(draws // 2 if antithetic else draws):
        noise = sigma * _randn_like(x, generator)
        total += denoiser(x + noise, sigma_b, **extra_args)
        if antithetic:
            total += denoiser(x - noise, sigma_b, **extra_args)
    return SamplerOutput(total / draws, draws)


def expected_nfe(name: str, steps: int) -> int:
    """Network calls a sampler makes for `steps` steps on a grid ending at sigma = 0."""
    return 2 * steps - 1 if name in ("edm_heun", "edm_stochastic") else steps
