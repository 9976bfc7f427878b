"""Samplers against an exact answer: driven by the exact denoiser E[x0 | x] of a known data
distribution, every sampler must reproduce that distribution within its usual step budget.

Tolerances (10,000 images x 3 pixels = 30,000 values; sampling noise: 0.003 on the mean, 0.4% on
the std):   mean within 0.02;  std within STD_TOL of the truth, set from the sampler's order:
    edm_heun 30 steps (59 NFE): 3%       dpmpp_2m 30 steps: 3%      ddpm 250 steps: 3%
    edm_stochastic 64 steps, S_churn 10: 3%       ddim 50 steps (first order): 6%
(measured errors: Heun 1-2%, DPM++ 1.5-2%, DDPM 1%, stochastic 0.5%, DDIM 3-5.5%.)
"""

from __future__ import annotations

import pytest
import torch

from imagen_train.config import DiffusionConfig, SamplerConfig
from imagen_train.diffusion import ClassifierFreeGuidance, SAMPLERS, build_diffusion, sample_heun
from test_diffusion_oracles import (EDMOracleNet, VPOracleNet, gaussian_denoiser, mixture_denoiser,
                                    mixture_std, text)

N_IMAGES = 10_000
SHAPE = (N_IMAGES, 3, 1, 1)
BUDGET = {"edm_heun": 30, "dpmpp_2m": 30, "ddpm": 250, "ddim": 50, "edm_stochastic": 64}
STD_TOL = {"edm_heun": 0.03, "dpmpp_2m": 0.03, "ddpm": 0.03, "ddim": 0.06, "edm_stochastic": 0.03}
OPTIONS = {"edm_stochastic": {"s_churn": 10.0}}
MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2) per pixel
A, S0 = 0.6, 0.2  # mixture 0.5 N(-A, S0^2) + 0.5 N(A, S0^2)

FORMULATIONS = {
    "edm": DiffusionConfig(formulation="edm"),
    "cosine-eps": DiffusionConfig(formulation="continuous", schedule="cosine", prediction="eps"),
    "linear-v": DiffusionConfig(formulation="continuous", schedule="linear", prediction="v"),
    "cosine-x0": DiffusionConfig(formulation="continuous", schedule="cosine", prediction="x0"),
}


def _oracle_net(cfg: DiffusionConfig, denoise):
    if cfg.formulation == "edm":
        return EDMOracleNet(denoise, cfg.sigma_data)
    return VPOracleNet(denoise, cfg.prediction)


def _sampler_cfg(name: str, **kw) -> SamplerConfig:
    opts = dict(name=name, steps=BUDGET[name], guidance_scale=1.0, thresholding="none")
    opts.update({k: v for k, v in OPTIONS.get(name, {}).items()})
    opts.update(kw)
    return SamplerConfig(**opts)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
def test_sample_reproduces_gaussian_data(formulation, name):
    """Full path: diffusion.sample -> preconditioning -> a network-shaped exact oracle."""
    cfg = FORMULATIONS[formulation]
    diffusion = build_diffusion(cfg)
    net = _oracle_net(cfg, gaussian_denoiser(MU, S))
    emb, mask = text(N_IMAGES)
    result = diffusion.sample(net, SHAPE, emb, mask, _sampler_cfg(name),
                              generator=torch.Generator().manual_seed(1))
    x = result.images.double()
    assert abs(float(x.mean()) - MU) < 0.02, float(x.mean())
    assert abs(float(x.std()) / S - 1) < STD_TOL[name], float(x.std())
    assert result.nfe == net.calls


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_reproduces_bimodal_data(name):
    """Denoiser level: a mixture of two narrow Gaussians at +-A; modes balanced, spread right."""
    diffusion = build_diffusion(FORMULATIONS["edm"])
    sigmas = diffusion.sigmas(name, BUDGET[name])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g) * sigmas[0]
    out = SAMPLERS[name](mixture_denoiser(A, S0), x, sigmas, generator=g, **OPTIONS.get(name, {}))
    y = out.samples.double()
    assert abs(float(y.mean())) < 0.02
    assert abs(float(y.std()) / mixture_std(A, S0) - 1) < STD_TOL[name]
    assert abs(float((y > 0).double().mean()) - 0.5) < 0.02  # both modes, equally weighted
    assert abs(float(y.abs().mean()) / A - 1) < STD_TOL[name]  # each mode in the right place


def test_sampler_error_shrinks_with_steps():
    """Heun is a convergent solver: its std error on Gaussian data falls as steps grow."""
    diffusion = build_diffusion(FORMULATIONS["edm"])
    errors = []
    for steps in (8, 16, 64):
        g = torch.Generator().manual_seed(3)
        sigmas = diffusion.sigmas("edm_heun", steps)
        x = torch.randn(SHAPE, generator=g) * sigmas[0]
        y = sample_heun(gaussian_denoiser(0.0, S), x, sigmas).samples
        errors.append(abs(float(y.std()) / S - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


@pytest.mark.parametrize("name", ["edm_heun", "ddpm"])
def test_guidance_scale_one_equals_unguided(name):
    """CFG at w = 1 returns the conditional prediction: same samples as no guidance at all."""
    diffusion = build_diffusion(FORMULATIONS["cosine-eps"])
    emb, mask = text(64)

    def net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        # Depends on the text, so the unconditional half differs from the conditional one.
        return 0.5 * x + text_emb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 0.1 * noise_cond.reshape(-1, 1, 1, 1)

    bare = diffusion.denoiser(net)
    guided = ClassifierFreeGuidance(bare, 1.0)
    sigmas = diffusion.sigmas(name, 20)
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    extra = {"text_emb": emb, "text_mask": mask}
    a = SAMPLERS[name](bare, x, sigmas, extra, generator=torch.Generator().manual_seed(5)).samples
    b = SAMPLERS[name](guided, x, sigmas, extra, generator=torch.Generator().manual_seed(5)).samples
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # And a scale other than one changes them.
    c = SAMPLERS[name](ClassifierFreeGuidance(bare, 3.0), x, sigmas, extra,
                       generator=torch.Generator().manual_seed(5)).samples
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_ends_on_the_denoised_prediction_and_adds_no_noise_at_the_last_step(name):
    """The last step (to sigma = 0) returns D(x, sigma_last) exactly: no noise and no second-order
    correction after it, so the output is as clean as the network's last prediction."""
    from imagen_train.diffusion.schedules import karras_sigmas

    def denoiser(x, sigma):  # a smooth x0 prediction that still depends on x
        return 0.3 * torch.tanh(x) + 0.1

    seen = []
    sigmas = karras_sigmas(8, 0.002, 80.0)
    x = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 80.0
    out = SAMPLERS[name](denoiser, x, sigmas, callback=seen.append, generator=torch.Generator().manual_seed(1),
                         **OPTIONS.get(name, {}))
    last = seen[-1]
    assert float(last["sigma"]) == pytest.approx(float(sigmas[-2]))
    torch.testing.assert_close(out.samples, last["denoised"], rtol=0, atol=1e-6)
