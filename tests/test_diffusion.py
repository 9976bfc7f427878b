"""Unit tests for imagen_train.diffusion: forward process, preconditioning, conversions,
thresholding, guidance, NFE counting, CFG text drop, noise-conditioning augmentation and dtypes.
Sampler accuracy: test_diffusion_samplers.py; learning: test_diffusion_training.py; import rules:
test_layers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imagen_train.config import ConfigError, DiffusionConfig, NoiseAugConfig, SamplerConfig
from imagen_train.diffusion import (SAMPLERS, ClassifierFreeGuidance, EDMPrecond, LogSNRSchedule,
                                    VPPrecond, build_diffusion, dynamic_threshold, eps_from_v, eps_from_x0,
                                    expected_nfe, final_denoise_average, karras_sigmas, prediction_target,
                                    prediction_to_x0, sample_heun, static_threshold, v_from_x0_eps, ve_noise,
                                    vp_noise, x0_from_eps, x0_from_v)
from imagen_train.diffusion.guidance import batch_quantile
from test_diffusion_oracles import EDMOracleNet, gaussian_denoiser, text


class Spy:
    """A network that records every call and returns a fixed function of its input."""

    def __init__(self, fn=lambda x, noise_cond: 0.5 * x):
        self.fn, self.calls = fn, []

    def __call__(self, x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        self.calls.append(dict(x=x.clone(), noise_cond=noise_cond.clone(), text_emb=text_emb.clone(),
                               text_mask=text_mask.clone(),
                               lowres=None if lowres is None else lowres.clone(),
                               lowres_noise_cond=None if lowres_noise_cond is None else lowres_noise_cond.clone()))
        return self.fn(x, noise_cond)


# ----------------------------------------------------------------------------------------------
# Schedules and the forward process.

@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_forward_process_matches_schedule(kind):
    """x_t = alpha x0 + sigma eps: empirical mean alpha * x0 and variance sigma^2, with alpha and
    sigma from the schedule's textbook formula (independent of the module's log-SNR code)."""
    schedule = LogSNRSchedule(kind)
    x0_value, n = 0.7, 200_000
    torch.manual_seed(0)
    for t in (0.05, 0.3, 0.6, 0.9):
        if kind == "cosine":
            phi = (t + 0.008) / 1.008 * math.pi / 2
            alpha, sigma = math.cos(phi), math.sin(phi)
        else:
            alpha = math.exp(-0.5 * (0.1 * t + 0.5 * 19.9 * t * t))
            sigma = math.sqrt(1 - alpha**2)
        log_snr = schedule(torch.full((n,), t))
        x_t = vp_noise(torch.full((n, 1), x0_value), log_snr, torch.randn(n, 1))
        assert abs(float(x_t.mean()) - alpha * x0_value) < 4 * sigma / math.sqrt(n) + 1e-4
        assert abs(float(x_t.var()) / sigma**2 - 1) < 0.015


def test_edm_forward_process():
    n, sigma = 200_000, 1.7
    torch.manual_seed(0)
    x = ve_noise(torch.full((n, 1), -0.4), torch.full((n,), sigma), torch.randn(n, 1))
    assert abs(float(x.mean()) + 0.4) < 0.02
    assert abs(float(x.std()) / sigma - 1) < 0.01


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_is_decreasing_finite_and_clamped(kind):
    schedule = LogSNRSchedule(kind)
    log_snr = schedule(torch.linspace(0, 1, 1001))
    assert torch.isfinite(log_snr).all()
    assert (log_snr[1:] <= log_snr[:-1]).all()
    lo, hi = schedule.sigma_range()
    assert lo < 0.02 and hi > 100


def test_karras_sigmas():
    sigmas = karras_sigmas(18, 0.002, 80.0)
    assert sigmas.shape == (19,)
    assert math.isclose(float(sigmas[0]), 80.0, rel_tol=1e-5)
    assert math.isclose(float(sigmas[-2]), 0.002, rel_tol=1e-4)
    assert float(sigmas[-1]) == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


# ----------------------------------------------------------------------------------------------
# Preconditioning and conversions.

def test_edm_denoiser_is_identity_at_zero_noise():
    precond = EDMPrecond(0.5)
    net = lambda x, noise_cond, *a, **k: torch.randn_like(x) * 10  # noqa: E731  any output
    x = torch.randn(4, 3, 8, 8)
    emb, mask = text(4)
    out = precond.denoise(net, x, torch.full((4,), 1e-7), emb, mask)
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def test_edm_scalings_match_table_1():
    precond = EDMPrecond(0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip, c_out, c_in = precond.scalings(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(precond.noise_cond(sigma), sigma.log() / 4)
    # The network's target has unit variance for data of std sigma_data (EDM's design goal).
    torch.manual_seed(0)
    x0, n = torch.randn(100_000) * 0.5, torch.randn(100_000)
    for s in (0.05, 1.0, 20.0):
        cs, co, ci = precond.scalings(torch.tensor(s))
        target = (x0 - cs * (x0 + s * n)) / co
        assert abs(float(target.std()) - 1) < 0.02
        assert abs(float((ci * (x0 + s * n)).std()) - 1) < 0.02


def test_conversions_round_trip():
    torch.manual_seed(0)
    log_snr = torch.randn(16, 1, 1, 1) * 4
    alpha, sigma = torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()
    x0, eps = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    x_t = alpha * x0 + sigma * eps
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5, rtol=1e-5)
    for kind in ("eps", "v", "x0"):
        target = prediction_target(kind, x0, eps, alpha, sigma)
        torch.testing.assert_close(prediction_to_x0(target, kind, x_t, alpha, sigma), x0, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_vp_denoiser_recovers_x0_from_the_true_target(prediction):
    """A network that outputs the true eps / v / x0 makes the VP denoiser return x0 exactly."""
    schedule = LogSNRSchedule("cosine")
    precond = VPPrecond(schedule, prediction)
    torch.manual_seed(0)
    x0, eps = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    sigma = torch.logspace(-1.5, 1.5, 8)  # VE sigma
    x_ve = x0 + sigma.reshape(-1, 1, 1, 1) * eps

    def net(x_vp, noise_cond, *a, **k):
        log_snr = (8 * noise_cond).reshape(-1, 1, 1, 1)
        alpha, sig = torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()
        torch.testing.assert_close(x_vp, alpha * x0 + sig * eps, atol=1e-5, rtol=1e-5)
        return prediction_target(prediction, x0, eps, alpha, sig)

    emb, mask = text(8)
    torch.testing.assert_close(precond.denoise(net, x_ve, sigma, emb, mask), x0, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Thresholding.

def test_batch_quantile_matches_torch():
    x = torch.randn(5, 1001)
    torch.testing.assert_close(batch_quantile(x, 0.995), torch.quantile(x, 0.995, dim=1))
    torch.testing.assert_close(batch_quantile(x, 0.5), torch.quantile(x, 0.5, dim=1))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001, 3 * 64 * 64])
def test_batch_quantile_picks_the_same_elements_as_kthvalue(n):
    """One partial selection replaced two kthvalue passes: the order statistics, and so the
    interpolated quantile, must be bit-identical (ties and the ends of the range included)."""
    g = torch.Generator().manual_seed(n)
    for x in (torch.randn(3, n, generator=g), torch.randn(3, n, generator=g).round()):
        for q in (0.0, 0.3, 0.5, 0.9, 0.995, 1.0):
            pos = q * (n - 1)
            lo, hi = int(pos), min(int(pos) + 1, n - 1)
            v_lo, v_hi = x.kthvalue(lo + 1, dim=1).values, x.kthvalue(hi + 1, dim=1).values
            assert torch.equal(batch_quantile(x, q), v_lo + (pos - lo) * (v_hi - v_lo))


def test_dynamic_threshold():
    torch.manual_seed(0)
    big = torch.randn(6, 3, 8, 8) * 3
    out = dynamic_threshold(big, 0.995)
    assert out.abs().max() <= 1.0 + 1e-6
    # The formula, per sample.
    s = torch.quantile(big.abs().flatten(1), 0.995, dim=1).clamp_min(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, torch.maximum(torch.minimum(big, s), -s) / s)
    # In-range predictions are untouched (s = 1).
    small = torch.rand(6, 3, 8, 8) * 2 - 1
    assert torch.equal(dynamic_threshold(small), small)
    # Mixed batch: the in-range sample is not affected by the out-of-range one.
    mixed = torch.stack([small[0], big[0]])
    assert torch.equal(dynamic_threshold(mixed)[0], small[0])
    assert torch.equal(static_threshold(big), big.clamp(-1, 1))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_thresholding_is_applied_in_every_sampler(formulation, name):
    """Data N(0, 2^2) lies mostly outside [-1, 1]: without thresholding samples do too; with
    dynamic or static thresholding every sampler's output is in range."""
    diffusion = build_diffusion(DiffusionConfig(formulation=formulation))
    emb, mask = text(64)
    if formulation == "edm":
        net = EDMOracleNet(gaussian_denoiser(0.0, 2.0))
    else:
        from test_diffusion_oracles import VPOracleNet
        net = VPOracleNet(gaussian_denoiser(0.0, 2.0), "eps")
    results = {}
    for mode in ("none", "dynamic", "static"):
        cfg = SamplerConfig(name=name, steps=10, guidance_scale=1.0, thresholding=mode, s_churn=5.0)
        results[mode] = diffusion.sample(net, (64, 3, 4, 4), emb, mask, cfg,
                                         generator=torch.Generator().manual_seed(0)).images
    assert results["none"].abs().max() > 2.0
    assert results["dynamic"].abs().max() <= 1.0 + 1e-5
    assert results["static"].abs().max() <= 1.0 + 1e-5


# ----------------------------------------------------------------------------------------------
# Guidance and NFE.

def test_guidance_batches_cond_and_uncond_in_one_forward():
    spy = Spy(lambda x, nc: torch.zeros_like(x))
    emb, mask = text(3)

    def net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        spy(x, noise_cond, text_emb, text_mask, lowres, lowres_noise_cond)
        # x0 = mean of the text embedding: 0 for the unconditional half.
        return text_emb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(x)

    bare = lambda x, sigma, **kw: net(x, sigma, **kw)  # noqa: E731  (a denoiser: x0 = net output)
    guided = ClassifierFreeGuidance(bare, 4.0)
    x = torch.randn(3, 3, 2, 2)
    lowres = torch.randn(3, 3, 1, 1)
    out = guided(x, torch.ones(3), text_emb=emb, text_mask=mask, lowres=lowres,
                 lowres_noise_cond=torch.zeros(3))
    (call,) = spy.calls
    assert call["x"].shape[0] == 6
    torch.testing.assert_close(call["text_emb"][:3], emb)
    assert torch.equal(call["text_emb"][3:], torch.zeros_like(emb))
    assert torch.equal(call["text_mask"], torch.cat([mask, mask]))
    assert torch.equal(call["lowres"], torch.cat([lowres, lowres]))
    cond = emb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, (0 + 4.0 * (cond - 0)).expand_as(x))


def test_guidance_interval_guides_only_inside_its_noise_levels():
    emb, mask = text(3)
    batches = []

    def bare(x, sigma, text_emb, text_mask):
        batches.append(x.shape[0])
        return text_emb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(x)  # 0 for the unconditional half

    cond = emb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand(3, 3, 2, 2)
    guided = ClassifierFreeGuidance(bare, 4.0, interval=(0.5, 3.0))
    x = torch.randn(3, 3, 2, 2)
    inside = guided(x, torch.full((3,), 3.0), text_emb=emb, text_mask=mask)
    torch.testing.assert_close(inside, 4.0 * cond)
    outside = guided(x, torch.full((3,), 0.5), text_emb=emb, text_mask=mask)  # the low end is open
    torch.testing.assert_close(outside, cond)
    assert batches == [6, 3]  # outside the interval: one pass of the conditional batch only
    mixed = guided(x, torch.tensor([0.2, 1.0, 10.0]), text_emb=emb, text_mask=mask)
    torch.testing.assert_close(mixed, torch.stack([cond[0], 4.0 * cond[1], cond[2]]))


def test_guidance_interval_reaches_the_sampler_and_is_checked():
    calls = []

    def net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    emb, mask = text(2)
    diffusion = build_diffusion(DiffusionConfig())
    sampler = SamplerConfig(name="edm_heun", steps=6, guidance_scale=3.0, guidance_interval=[0.3, 3.0])
    diffusion.sample(net, (2, 3, 4, 4), emb, mask, sampler, generator=torch.Generator().manual_seed(0))
    sigmas = diffusion.sigmas("edm_heun", 6, torch.device("cpu"))
    assert 0 < sum(s > 0.3 and s <= 3.0 for s in sigmas.tolist()) < len(sigmas) - 1
    assert set(calls) == {2, 4} and calls[0] == 2  # sigma_max 80 lies above the interval
    with pytest.raises(ConfigError, match="guidance_interval"):
        SamplerConfig(guidance_interval=[3.0, 0.3])


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_is_reported(name, guidance_scale):
    """NFE = network forward calls: Heun / EDM 2N - 1, the others N; guidance keeps the count and
    doubles the batch of each call (result.net_batch_factor = 2)."""
    diffusion = build_diffusion(DiffusionConfig(formulation="edm"))
    spy = Spy()
    emb, mask = text(2)
    steps = 7
    cfg = SamplerConfig(name=name, steps=steps, guidance_scale=guidance_scale, s_churn=1.0)
    result = diffusion.sample(spy, (2, 3, 4, 4), emb, mask, cfg)
    assert result.nfe == len(spy.calls) == expected_nfe(name, steps)
    assert result.nfe == (2 * steps - 1 if name.startswith("edm") else steps)
    factor = 1 if guidance_scale == 1.0 else 2
    assert result.net_batch_factor == factor
    assert all(c["x"].shape[0] == 2 * factor for c in spy.calls)


def test_sampler_counts_its_own_calls():
    calls = []
    denoise = lambda x, sigma, **kw: calls.append(1) or torch.zeros_like(x)  # noqa: E731
    out = sample_heun(denoise, torch.randn(2, 3, 4, 4) * 80, karras_sigmas(5, 0.002, 80.0))
    assert out.nfe == len(calls) == 9


def test_final_denoise_average_keeps_the_error_common_to_all_draws():
    """A denoiser that leaks half of the noise it is handed: the mean over K draws keeps the
    prediction's part that does not depend on the draw and 1/sqrt(K) of the rest."""
    y = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    leaky = lambda x, sigma, **kw: y + 0.5 * (x - y)  # noqa: E731
    x_hat = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    common = y + 0.5 * (x_hat - y)
    spread = {}
    for draws in (1, 64):
        out = final_denoise_average(leaky, x_hat, 0.5, draws, generator=torch.Generator().manual_seed(0))
        assert out.nfe == draws
        spread[draws] = float((out.samples - common).std())
    assert spread[1] == pytest.approx(0.25, rel=0.05)  # 0.5 * sigma
    assert spread[64] / spread[1] == pytest.approx(1 / 8, rel=0.2)
    again = final_denoise_average(leaky, x_hat, 0.5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.samples, out.samples)


def test_antithetic_final_average_cancels_the_error_linear_in_the_noise():
    """Draws in pairs n, -n: for the leaky denoiser above (its error linear in the noise) two draws
    already give the common part exactly; for one whose error has a quadratic part too, only that
    part is left, still averaged over the pairs. An odd draw count is refused."""
    y = torch.linspace(-1, 1, 64 * 64).reshape(1, 1, 64, 64)
    x_hat = y + 0.1 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    leaky = lambda x, sigma, **kw: y + 0.5 * (x - y)  # noqa: E731
    out = final_denoise_average(leaky, x_hat, 0.5, 2, generator=torch.Generator().manual_seed(0), antithetic=True)
    assert out.nfe == 2
    torch.testing.assert_close(out.samples, y + 0.5 * (x_hat - y), rtol=0, atol=1e-6)
    squared = lambda x, sigma, **kw: y + 0.5 * (x - y) + 0.1 * (x - x_hat) ** 2  # noqa: E731
    mean = y + 0.5 * (x_hat - y) + 0.1 * 0.25  # E[(sigma n)^2] = sigma^2
    err = {anti: float((final_denoise_average(squared, x_hat, 0.5, 16, generator=torch.Generator().manual_seed(0),
                                              antithetic=anti).samples - mean).std()) for anti in (False, True)}
    assert err[False] == pytest.approx(0.25 / 4, rel=0.15)  # mostly the linear part: 0.5 sigma / sqrt(16)
    assert err[True] == pytest.approx(0.1 * 0.25 * 2 ** 0.5 / 8 ** 0.5, rel=0.15)  # 0.1 sigma^2 sqrt(2) / sqrt(pairs)
    with pytest.raises(ValueError, match="odd"):
        final_denoise_average(leaky, x_hat, 0.5, 3, antithetic=True)


def test_antithetic_needs_an_even_draw_count_in_the_config():
    from imagen_train.config import ConfigError, SamplerConfig
    assert SamplerConfig(final_denoise_sigma=1.0, final_denoise_draws=8, final_denoise_antithetic=True)
    with pytest.raises(ConfigError, match="final_denoise_draws"):
        SamplerConfig(final_denoise_sigma=1.0, final_denoise_draws=7, final_denoise_antithetic=True)


def test_final_denoise_runs_after_the_sampler_unguided_at_its_sigma():
    """Off by default; on, it adds `draws` calls after the sampler's, each on the conditional batch
    alone (no unconditional half) at sigma final_denoise_sigma, with the low-res image of SR stages."""
    emb, mask = text(2)
    lowres = torch.rand(2, 3, 2, 2)
    diffusion = build_diffusion(DiffusionConfig(formulation="edm"))
    plain, spy_plain = SamplerConfig(name="edm_heun", steps=4, guidance_scale=3.0), Spy()
    base = diffusion.sample(spy_plain, (2, 3, 4, 4), emb, mask, plain, lowres=lowres,
                            generator=torch.Generator().manual_seed(0))
    assert base.final_nfe == 0 and len(spy_plain.calls) == base.nfe == expected_nfe("edm_heun", 4)

    spy = Spy()
    cfg = SamplerConfig(name="edm_heun", steps=4, guidance_scale=3.0, final_denoise_sigma=0.5,
                        final_denoise_draws=3)
    result = diffusion.sample(spy, (2, 3, 4, 4), emb, mask, cfg, lowres=lowres,
                              generator=torch.Generator().manual_seed(0))
    assert (result.nfe, result.final_nfe, result.net_batch_factor) == (base.nfe, 3, 2)
    assert len(spy.calls) == base.nfe + 3
    for before, after in zip(spy_plain.calls, spy.calls):  # the sampler's calls are unchanged
        assert torch.equal(before["x"], after["x"])
    for call in spy.calls[base.nfe:]:
        assert call["x"].shape[0] == 2 and torch.equal(call["text_emb"], emb)
        assert torch.allclose(call["noise_cond"], torch.full((2,), math.log(0.5) / 4))
        assert call["lowres"] is not None and torch.equal(call["lowres"], spy.calls[0]["lowres"][:2])
    assert not torch.equal(result.images, base.images)


@pytest.mark.parametrize("field, value", [("final_denoise_sigma", -0.1), ("final_denoise_draws", 0),
                                          ("final_denoise_draws", 2.5)])
def test_final_denoise_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplerConfig(**{field: value})


# ----------------------------------------------------------------------------------------------
# Training-time conditioning: CFG text drop and noise augmentation.

@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_cfg_drop(formulation):
    emb, mask = text(16)
    images = torch.rand(16, 3, 4, 4) * 2 - 1
    for p, expect_zero in ((1.0, True), (0.0, False)):
        diffusion = build_diffusion(DiffusionConfig(formulation=formulation, cond_drop_prob=p))
        spy = Spy()
        loss = diffusion.training_loss(spy, images, emb, mask)
        assert loss.shape == (16,) and torch.isfinite(loss).all()
        (call,) = spy.calls
        assert torch.equal(call["text_mask"], mask)  # the mask is always kept
        if expect_zero:
            assert torch.equal(call["text_emb"], torch.zeros_like(emb))
        else:
            assert torch.equal(call["text_emb"], emb)


def test_cfg_drop_rate():
    diffusion = build_diffusion(DiffusionConfig(cond_drop_prob=0.3))
    emb, mask = text(4000)
    emb = emb + 1.0  # no row is all-zero by chance
    spy = Spy()
    torch.manual_seed(0)
    diffusion.training_loss(spy, torch.zeros(4000, 1, 1, 1), emb, mask)
    dropped = (spy.calls[0]["text_emb"].abs().sum(dim=(1, 2)) == 0).double().mean()
    assert abs(float(dropped) - 0.3) < 0.03


def _expected_corruption(formulation: str, lowres_noise_cond: torch.Tensor):
    """(alpha, noise std) of the low-res corruption, recovered from the level the net was told."""
    if formulation == "edm":
        sigma = torch.exp(4 * lowres_noise_cond)  # ln(sigma) / 4
        log_snr = -2 * sigma.log()
    else:
        log_snr = 8 * lowres_noise_cond  # log_snr / 8
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_noise_augmentation_at_training_matches_the_reported_level(formulation):
    max_level = 0.6
    cfg = DiffusionConfig(formulation=formulation, noise_aug=NoiseAugConfig(max_level=max_level))
    diffusion = build_diffusion(cfg)
    batch, c = 512, 0.5
    lowres = torch.full((batch, 3, 16, 16), c)  # 768 values per sample
    emb, mask = text(batch)
    spy = Spy()
    torch.manual_seed(0)
    diffusion.training_loss(spy, torch.zeros(batch, 3, 8, 8), emb, mask, lowres=lowres)
    (call,) = spy.calls
    cond, seen = call["lowres_noise_cond"], call["lowres"]
    assert cond.shape == (batch,) and seen.shape == lowres.shape
    alpha, noise_std = _expected_corruption(formulation, cond)
    mean = seen.flatten(1).mean(1)
    std = seen.flatten(1).std(1)
    torch.testing.assert_close(mean, alpha * c, atol=4 * float(noise_std.max()) / math.sqrt(768) + 1e-4, rtol=0)
    ratio = std / noise_std
    assert abs(float(ratio.mean()) - 1) < 0.01  # per-sample std estimates from 768 values each
    assert float((ratio - 1).abs().max()) < 0.2
    # The levels span [level 0, max_level] uniformly: check the end points of the range.
    sched_cond = lambda level: diffusion.noise_aug.noise_cond(diffusion.noise_aug.level_to_sigma(torch.tensor(level)))  # noqa: E731
    ends = sorted([float(sched_cond(0.0)), float(sched_cond(max_level))])
    assert ends[0] - 1e-4 <= float(cond.min()) and float(cond.max()) <= ends[1] + 1e-4
    assert float(cond.max() - cond.min()) > 0.9 * (ends[1] - ends[0])
    # Same order-1 scale as noise_cond.
    assert float(cond.abs().max()) < 3.0
    assert float(noise_std.max()) > 0.5  # max_level 0.6 is a real corruption


@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_noise_augmentation_at_sampling_noises_once_then_passes(formulation):
    diffusion = build_diffusion(DiffusionConfig(formulation=formulation))
    batch, c, level = 4, -0.3, 0.4
    lowres = torch.full((batch, 3, 32, 32), c)
    emb, mask = text(batch)
    spy = Spy()
    cfg = SamplerConfig(name="edm_heun", steps=4, guidance_scale=1.0, noise_aug_level=level)
    diffusion.sample(spy, (batch, 3, 8, 8), emb, mask, cfg, lowres=lowres, generator=torch.Generator().manual_seed(0))
    first = spy.calls[0]
    for call in spy.calls[1:]:  # the same corrupted image at every step, not re-noised
        assert torch.equal(call["lowres"], first["lowres"])
        assert torch.equal(call["lowres_noise_cond"], first["lowres_noise_cond"])
    cond = first["lowres_noise_cond"]
    assert torch.allclose(cond, cond[0].expand_as(cond))
    expected = diffusion.noise_aug.noise_cond(diffusion.noise_aug.level_to_sigma(torch.tensor(level)))
    assert math.isclose(float(cond[0]), float(expected), rel_tol=1e-5)
    alpha, noise_std = _expected_corruption(formulation, cond)
    seen = first["lowres"].flatten(1)
    torch.testing.assert_close(seen.std(1), noise_std, rtol=0.05, atol=0)
    torch.testing.assert_close(seen.mean(1), alpha * c, atol=4 * float(noise_std[0]) / math.sqrt(3072), rtol=0)
    # Level 0 is (nearly) clean, not skipped.
    spy0 = Spy()
    diffusion.sample(spy0, (batch, 3, 8, 8), emb, mask, SamplerConfig(name="ddim", steps=2, guidance_scale=1.0, noise_aug_level=0.0),
                     lowres=lowres)
    assert (spy0.calls[0]["lowres"] - lowres).abs().max() < 0.05
    assert spy0.calls[0]["lowres_noise_cond"] is not None


def test_base_stage_passes_no_lowres():
    diffusion = build_diffusion(DiffusionConfig())
    spy = Spy()
    emb, mask = text(2)
    diffusion.training_loss(spy, torch.zeros(2, 3, 4, 4), emb, mask)
    diffusion.sample(spy, (2, 3, 4, 4), emb, mask, SamplerConfig(steps=2))
    assert all(c["lowres"] is None and c["lowres_noise_cond"] is None for c in spy.calls)


# ----------------------------------------------------------------------------------------------
# Dtypes, gradients and hygiene.

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        return self.conv(x) + noise_cond.reshape(-1, 1, 1, 1) + text_emb.mean() * 0


@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_sample_with_bf16_net_and_under_autocast(formulation):
    diffusion = build_diffusion(DiffusionConfig(formulation=formulation))
    emb, mask = text(2)
    cfg = SamplerConfig(name="dpmpp_2m", steps=3, guidance_scale=3.0)
    net = _Tiny().to(torch.bfloat16)
    out = diffusion.sample(net, (2, 3, 8, 8), emb, mask, cfg, lowres=torch.zeros(2, 3, 4, 4))
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = diffusion.sample(_Tiny(), (2, 3, 8, 8), emb, mask, cfg)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    # The bf16 net trains too: the loss is float32 and gradients reach its weights.
    loss = diffusion.training_loss(net, torch.zeros(2, 3, 8, 8), emb, mask)
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert net.conv.weight.grad is not None


def test_sample_runs_without_grad():
    diffusion = build_diffusion(DiffusionConfig())
    emb, mask = text(2)
    out = diffusion.sample(_Tiny(), (2, 3, 8, 8), emb, mask, SamplerConfig(steps=2))
    assert not out.images.requires_grad


def test_unknown_sampler_is_refused():
    diffusion = build_diffusion(DiffusionConfig())
    cfg = SamplerConfig()
    cfg.name = "euler"  # bypasses the config's own check
    emb, mask = text(1)
    with pytest.raises(ValueError, match="euler"):
        diffusion.sample(_Tiny(), (1, 3, 4, 4), emb, mask, cfg)


# ----------------------------------------------------------------------------------------------
# One step of DDPM / DDIM against the posterior q(x_s | x_t, x0) in closed form.

def test_ddpm_step_samples_the_posterior_and_ddim_step_is_deterministic():
    """Ho et al. 2020 eq. 7 in VE space: mean x0 + (s/t)^2 (x_t - x0), std s sqrt(1 - (s/t)^2).
    (Another eta would still sample the right marginals; this pins eta = 1 for 'ddpm'.)"""
    x0_value, x_t_value, sigma_t, sigma_s, n = 0.4, 1.3, 2.0, 0.8, 200_000
    denoise = lambda x, sigma, **kw: torch.full_like(x, x0_value)  # noqa: E731
    x_t = torch.full((n, 1, 1, 1), x_t_value)
    sigmas = torch.tensor([sigma_t, sigma_s])  # one step, not ending at 0
    ddpm = SAMPLERS["ddpm"](denoise, x_t, sigmas, generator=torch.Generator().manual_seed(0)).samples
    ratio2 = (sigma_s / sigma_t) ** 2
    assert abs(float(ddpm.mean()) - (x0_value + ratio2 * (x_t_value - x0_value))) < 0.01
    assert abs(float(ddpm.std()) / (sigma_s * math.sqrt(1 - ratio2)) - 1) < 0.01
    ddim = SAMPLERS["ddim"](denoise, x_t, sigmas).samples
    expected = x0_value + sigma_s / sigma_t * (x_t_value - x0_value)
    torch.testing.assert_close(ddim, torch.full_like(ddim, expected))


# ----------------------------------------------------------------------------------------------
# Loss weighting.

@pytest.mark.parametrize("prediction", [None, "eps", "v"])
def test_zero_network_has_unit_loss_at_every_noise_level(prediction):
    """EDM: with F = 0, D = c_skip x and lambda(sigma) c_out(sigma)^2 = 1, so for data of std
    sigma_data the weighted loss is 1 at every sigma (Karras et al. 2022, section 5 / appendix B.6).
    Continuous: E[eps^2] = 1 and, for unit-variance data, E[v^2] = alpha^2 + sigma^2 = 1."""
    if prediction is None:
        cfg, data_std = DiffusionConfig(formulation="edm", cond_drop_prob=0.0), 0.5
    else:
        cfg, data_std = DiffusionConfig(formulation="continuous", prediction=prediction, cond_drop_prob=0.0), 1.0
    diffusion = build_diffusion(cfg)
    zero = lambda x, *a, **k: torch.zeros_like(x)  # noqa: E731
    torch.manual_seed(0)
    images = torch.randn(256, 3, 16, 16) * data_std
    emb, mask = text(256)
    loss = diffusion.training_loss(zero, images, emb, mask)  # (B,), 768 values per sample
    assert abs(float(loss.mean()) - 1) < 0.02
    assert float((loss - 1).abs().max()) < 0.3


def test_training_noise_level_distributions():
    """EDM: ln(sigma) ~ N(P_mean, P_std^2) (read back from c_noise = ln(sigma)/4); continuous:
    t ~ U(0, 1), so log_snr follows the schedule of a uniform t (read back from log_snr / 8)."""
    n = 20_000
    emb, mask = text(n, length=2, dim=2)
    images = torch.zeros(n, 1, 1, 1)
    torch.manual_seed(0)
    spy = Spy()
    build_diffusion(DiffusionConfig(formulation="edm")).training_loss(spy, images, emb, mask)
    ln_sigma = 4 * spy.calls[0]["noise_cond"]
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.03 and abs(float(ln_sigma.std()) - 1.2) < 0.03
    spy = Spy()
    diffusion = build_diffusion(DiffusionConfig(formulation="continuous", schedule="linear"))
    diffusion.training_loss(spy, images, emb, mask)
    log_snr = 8 * spy.calls[0]["noise_cond"]
    reference = diffusion.schedule(torch.linspace(0, 1, n))
    for q in (0.1, 0.5, 0.9):
        assert abs(float(torch.quantile(log_snr, q)) - float(torch.quantile(reference, q))) < 0.15


# ----------------------------------------------------------------------------------------------
# Host work per network call.

class _NoHostRead(torch.Tensor):
    """Noise levels whose values the host may not read one at a time: on a GPU each read waits
    for every queued kernel (`tolist()`, one copy per run, is allowed)."""

    def __bool__(self):
        raise AssertionError("a sampler branched on a device tensor")

    def __float__(self):
        raise AssertionError("a sampler read a device tensor with float()")

    def item(self):
        raise AssertionError("a sampler read a device tensor with item()")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_branch_on_a_host_copy_of_the_noise_levels(name):
    options = {"s_churn": 10.0} if name == "edm_stochastic" else {}
    sigmas = karras_sigmas(4, 0.002, 80.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 80.0

    def run(levels):
        return SAMPLERS[name](lambda x, sigma: 0.5 * x / (1 + sigma[:, None, None, None]), x, levels,
                              generator=torch.Generator().manual_seed(1), **options)

    with pytest.raises(AssertionError, match="branched"):
        bool(sigmas.as_subclass(_NoHostRead)[0] > 0)  # the guard works
    watched, plain = run(sigmas.as_subclass(_NoHostRead)), run(sigmas)
    assert watched.nfe == plain.nfe == expected_nfe(name, 4)
    assert torch.equal(watched.samples.as_subclass(torch.Tensor), plain.samples)


def test_guidance_doubles_the_conditioning_once_per_run():
    """The network sees one doubled text tensor (and low-res image) for the whole run, and the
    samples equal those of a guidance that doubles afresh at every call."""
    seen = []

    def denoiser(x, sigma, text_emb, text_mask, lowres):
        seen.append((text_emb, text_mask, lowres))
        shift = (text_emb * text_mask[..., None]).mean((1, 2))[:, None, None, None] + lowres.mean()
        return 0.5 * x / (1 + sigma[:, None, None, None]) + shift

    g = torch.Generator().manual_seed(0)
    emb, mask = torch.randn(2, 5, 8, generator=g), torch.rand(2, 5, generator=g) > 0.3
    cond = {"text_emb": emb, "text_mask": mask, "lowres": torch.randn(2, 3, 2, 2, generator=g)}
    x, sigmas = torch.randn(2, 3, 4, 4, generator=g) * 80.0, karras_sigmas(3, 0.002, 80.0)
    guided = sample_heun(ClassifierFreeGuidance(denoiser, 4.0), x, sigmas, extra_args=cond)
    assert len(seen) == guided.nfe == 5
    assert all(all(a is b for a, b in zip(call, seen[0])) for call in seen)
    assert seen[0][0].shape == (4, 5, 8) and not seen[0][0][2:].any()  # [text; zeros]

    def fresh(x, sigma, **kw):
        return ClassifierFreeGuidance(denoiser, 4.0)(x, sigma, **kw)

    assert torch.equal(guided.samples, sample_heun(fresh, x, sigmas, extra_args=cond).samples)
    # Another text tensor (same values): the conditioning is doubled again, not taken from the cache.
    seen.clear()
    cfg = ClassifierFreeGuidance(denoiser, 4.0)
    cfg(x, sigmas[:1].expand(2), **cond)
    cfg(x, sigmas[:1].expand(2), **{**cond, "text_emb": emb.clone()})
    assert seen[0][0] is not seen[1][0] and torch.equal(seen[0][0], seen[1][0])
