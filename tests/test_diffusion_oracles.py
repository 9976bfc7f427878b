"""Shared helpers for the diffusion tests: closed-form denoisers and network-shaped oracles.

The oracles invert the preconditioning with their own formulas (not the module's), so a wrong
c_skip / c_out / c_in or eps/v conversion in imagen_train.diffusion makes the samplers miss.
"""

from __future__ import annotations

import math

import torch


def gaussian_denoiser(mu: float, s: float):
    """E[x0 | x0 + sigma n = x] for x0 ~ N(mu, s^2): mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoise(x, sigma, **_):
        sigma2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return mu + s**2 / (s**2 + sigma2) * (x - mu)

    return denoise


def mixture_denoiser(a: float, s0: float):
    """E[x0 | x] for x0 ~ 0.5 N(-a, s0^2) + 0.5 N(a, s0^2) (s0 = 0: the two-point mixture +-a)."""

    def denoise(x, sigma, **_):
        var = s0**2 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
        w_plus = torch.sigmoid(2 * a * x / var)  # posterior weight of the +a component
        m_plus = a + s0**2 / var * (x - a)
        m_minus = -a + s0**2 / var * (x + a)
        return w_plus * m_plus + (1 - w_plus) * m_minus

    return denoise


def mixture_std(a: float, s0: float) -> float:
    return math.sqrt(a * a + s0 * s0)


class EDMOracleNet:
    """A 'network' whose EDM-preconditioned output is exactly `denoise` (Karras et al. table 1)."""

    def __init__(self, denoise, sigma_data: float = 0.5):
        self.denoise, self.sd = denoise, sigma_data
        self.calls = 0

    def __call__(self, x_in, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        self.calls += 1
        sigma = torch.exp(4 * noise_cond.double()).reshape(-1, 1, 1, 1)  # c_noise = ln(sigma) / 4
        sd2 = self.sd**2
        c_in = 1 / torch.sqrt(sigma**2 + sd2)
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sd / torch.sqrt(sigma**2 + sd2)
        x = x_in.double() / c_in
        return ((self.denoise(x, sigma.flatten()) - c_skip * x) / c_out).to(x_in.dtype)


class VPOracleNet:
    """A 'network' that predicts eps, v or x0 of a VP model exactly, from noise_cond = log_snr / 8."""

    def __init__(self, denoise, prediction: str):
        self.denoise, self.prediction = denoise, prediction
        self.calls = 0

    def __call__(self, x_vp, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        self.calls += 1
        log_snr = 8 * noise_cond.double().reshape(-1, 1, 1, 1)
        alpha, sigma_vp = torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()
        x = x_vp.double()
        x0 = self.denoise(x / alpha, (sigma_vp / alpha).flatten())
        eps = (x - alpha * x0) / sigma_vp
        out = {"eps": eps, "v": alpha * eps - sigma_vp * x0, "x0": x0}[self.prediction]
        return out.to(x_vp.dtype)


def text(batch: int, length: int = 4, dim: int = 8, seed: int = 0):
    """Random text embeddings (B, L, D) and a mask with some padding."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length // 2 + 1:] = False
    return emb, mask


# ----------------------------------------------------------------------------------------------
# The oracles themselves: their closed forms match a Monte Carlo posterior mean.

def _monte_carlo_posterior_mean(sample_x0, x_query: float, sigma: float, n: int = 400_000) -> float:
    g = torch.Generator().manual_seed(0)
    x0 = sample_x0(n, g)
    weights = torch.softmax(-((x_query - x0) ** 2) / (2 * sigma**2), dim=0)  # p(x | x0), normalised
    return float((weights * x0).sum())


def test_gaussian_denoiser_is_the_posterior_mean():
    mu, s = 0.3, 0.5
    denoise = gaussian_denoiser(mu, s)
    sample = lambda n, g: mu + s * torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    for x_query, sigma in [(0.9, 0.4), (-0.5, 1.5)]:
        exact = float(denoise(torch.tensor([x_query]), torch.tensor([sigma])))
        assert abs(exact - _monte_carlo_posterior_mean(sample, x_query, sigma)) < 0.01


def test_mixture_denoiser_is_the_posterior_mean():
    a, s0 = 0.6, 0.2
    denoise = mixture_denoiser(a, s0)

    def sample(n, g):
        sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return sign * a + s0 * torch.randn(n, generator=g, dtype=torch.float64)

    for x_query, sigma in [(0.2, 0.3), (-0.7, 1.0), (0.05, 0.1)]:
        exact = float(denoise(torch.tensor([x_query]), torch.tensor([sigma])))
        assert abs(exact - _monte_carlo_posterior_mean(sample, x_query, sigma)) < 0.01
