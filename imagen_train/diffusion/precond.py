"""Preconditioning: turn a network into a denoiser D(x, sigma, **cond) -> x0 prediction.

The network never sees noise levels directly (NVlabs/edm style): a wrapper scales its input,
chooses `noise_cond` and converts its output. Both formulations present the same view to the
samplers: x = x0 + sigma * n in VE sigma space (see schedules.py).

The network is called through caller.py's NetworkCaller (dtype, memory format, autocast,
float32 noise levels); a bare module gets the default one, running in its parameters' dtype.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from torch import Tensor

from .caller import as_caller
from .schedules import LogSNRSchedule, log_snr_from_sigma, vp_from_sigma

Denoiser = Callable[..., Tensor]  # D(x (B,C,H,W), sigma (B,), **extra_args) -> x0 (B,C,H,W)
PREDICTIONS = ("eps", "v", "x0")


# ----------------------------------------------------------------------------------------------
# eps / v / x0 conversions in VP space: x_t = alpha * x0 + sigma * eps, v = alpha * eps - sigma * x0
# (Salimans & Ho 2022), with alpha^2 + sigma^2 = 1. alpha and sigma broadcast against x_t.

def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (x_t - sigma * eps) / alpha."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha * x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha * eps - sigma * x0."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = alpha * x_t - sigma * v (uses alpha^2 + sigma^2 = 1)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = sigma * x_t + alpha * v (uses alpha^2 + sigma^2 = 1)."""
    return sigma * x_t + alpha * v


def prediction_to_x0(pred: Tensor, prediction: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a network output of kind `prediction` (eps, v or x0) to x0."""
    if prediction == "eps":
        return x0_from_eps(x_t, pred, alpha, sigma)
    if prediction == "v":
        return x0_from_v(x_t, pred, alpha, sigma)
    if prediction == "x0":
        return pred
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def prediction_target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of kind `prediction` for clean x0 and noise eps."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(Protocol):
    """What both preconditioners offer."""

    def noise_cond(self, sigma: Tensor) -> Tensor: ...
    def denoise(self, net: Callable, x: Tensor, sigma: Tensor, **cond) -> Tensor: ...
    def bind(self, net: Callable) -> Denoiser: ...


class _Bound:
    """A preconditioner bound to one network: the denoiser D(x, sigma, **cond) samplers drive."""

    def __init__(self, precond: "Precond", net: Callable):
        self.precond, self.net = precond, as_caller(net)  # the parameter dtype read once, not per step

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return self.precond.denoise(self.net, x, sigma, **cond)


# ----------------------------------------------------------------------------------------------
# Karras et al. 2022, table 1 and eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

class EDMPrecond:
    """EDM preconditioning with c_noise = ln(sigma) / 4."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for sigma of any shape."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def noise_cond(self, sigma: Tensor) -> Tensor:
        """c_noise = ln(sigma) / 4."""
        return sigma.log() / 4

    def denoise(self, net: Callable, x: Tensor, sigma: Tensor, text_emb: Tensor, text_mask: Tensor,
                lowres: Optional[Tensor] = None, lowres_noise_cond: Optional[Tensor] = None) -> Tensor:
        """x0 prediction for x (B, C, H, W) at sigma (B,)."""
        c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma))
        f = as_caller(net)(c_in * x, self.noise_cond(sigma), text_emb, text_mask, lowres, lowres_noise_cond)
        return c_skip * x + c_out * f

    def bind(self, net: Callable) -> Denoiser:
        """The denoiser D(x, sigma, **cond) for this network."""
        return _Bound(self, net)


# ----------------------------------------------------------------------------------------------
# A continuous-time VP model seen as a denoiser in sigma space (k-diffusion's VDenoiser/DiscreteEps
# trick): x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2), log_snr = -2 ln sigma.

class VPPrecond:
    """Continuous-time Gaussian diffusion (Imagen): the network predicts eps, v or x0 from x_vp."""

    def __init__(self, schedule: LogSNRSchedule, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        self.schedule, self.prediction = schedule, prediction

    def noise_cond(self, sigma: Tensor) -> Tensor:
        """noise_cond = log_snr / 8 (CONTRACTS.md)."""
        return log_snr_from_sigma(sigma) / 8

    def predict(self, net: Callable, x_vp: Tensor, log_snr: Tensor, text_emb: Tensor, text_mask: Tensor,
                lowres: Optional[Tensor] = None, lowres_noise_cond: Optional[Tensor] = None) -> Tensor:
        """The raw network output (eps, v or x0) for a VP sample at log_snr (B,)."""
        return as_caller(net)(x_vp, log_snr / 8, text_emb, text_mask, lowres, lowres_noise_cond)

    def denoise(self, net: Callable, x: Tensor, sigma: Tensor, text_emb: Tensor, text_mask: Tensor,
                lowres: Optional[Tensor] = None, lowres_noise_cond: Optional[Tensor] = None) -> Tensor:
        """x0 prediction for a VE-space x (B, C, H, W) at sigma (B,)."""
        alpha, sigma_vp = (_bcast(c, x) for c in vp_from_sigma(sigma))
        x_vp = alpha * x
        pred = self.predict(net, x_vp, log_snr_from_sigma(sigma), text_emb, text_mask, lowres, lowres_noise_cond)
        return prediction_to_x0(pred, self.prediction, x_vp, alpha, sigma_vp)

    def bind(self, net: Callable) -> Denoiser:
        """The denoiser D(x, sigma, **cond) for this network."""
        return _Bound(self, net)
