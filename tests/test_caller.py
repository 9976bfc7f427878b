"""The one network caller (imagen_train/diffusion/caller.py): dtype, memory format, autocast, float32
noise levels, output dtype, and the conditioning casts a sampling run reuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagen_train.config import DiffusionConfig, SamplerConfig
from imagen_train.diffusion import NetworkCaller, as_caller, build_diffusion


class _Spy(nn.Module):
    """Records what it is called with; returns a 1x1 convolution of x in x's dtype."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1, dtype=dtype))
        self.calls = []

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        self.calls.append({"x": x, "noise_cond": noise_cond, "text_emb": text_emb, "text_mask": text_mask,
                           "lowres": lowres, "lowres_noise_cond": lowres_noise_cond,
                           "autocast": torch.is_autocast_enabled("cpu"),
                           "autocast_dtype": torch.get_autocast_dtype("cpu")})
        return F.conv2d(x, self.weight.to(x.dtype)) + noise_cond.to(x.dtype).reshape(-1, 1, 1, 1)


def _args(batch=2, lowres=True):
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(batch, 3, 8, 8, generator=gen), torch.rand(batch, generator=gen),
           torch.randn(batch, 5, 4, generator=gen), torch.ones(batch, 5, dtype=torch.bool)]
    if lowres:
        out += [torch.randn(batch, 3, 4, 4, generator=gen), torch.rand(batch, generator=gen)]
    return out


def test_a_bare_module_runs_in_its_parameter_dtype_with_float32_noise_levels():
    net = _Spy(torch.bfloat16)
    x, noise, emb, mask, low, low_noise = _args()
    out = NetworkCaller(net)(x, noise.bfloat16(), emb, mask, low, low_noise.bfloat16())
    call = net.calls[0]
    assert call["x"].dtype == call["text_emb"].dtype == call["lowres"].dtype == torch.bfloat16
    # Noise levels always go in as float32, even when handed over in bf16.
    assert call["noise_cond"].dtype == call["lowres_noise_cond"].dtype == torch.float32
    assert call["text_mask"] is mask  # the mask is never cast
    assert out.dtype == torch.float32  # back in x's dtype


def test_an_explicit_dtype_wins_over_the_parameters():
    net = _Spy(torch.float32)
    x, noise, emb, mask = _args(lowres=False)
    NetworkCaller(net, dtype=torch.float64)(x, noise, emb, mask)
    assert net.calls[0]["x"].dtype == net.calls[0]["text_emb"].dtype == torch.float64


def test_a_plain_callable_gets_its_inputs_as_given():
    seen = {}

    def net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None):
        seen.update(x=x, text_emb=text_emb, noise_cond=noise_cond)
        return x.double()

    x, noise, emb, mask = _args(lowres=False)
    out = NetworkCaller(net)(x, noise.half(), emb, mask)
    assert seen["x"] is x and seen["text_emb"] is emb
    assert seen["noise_cond"].dtype == torch.float32
    assert out.dtype == torch.float32


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_memory_format_applies_to_the_images_only(fmt):
    net = _Spy()
    x, noise, emb, mask, low, low_noise = _args()
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    NetworkCaller(net, dtype=torch.float32, memory_format=fmt)(x_nhwc, noise, emb, mask, low, low_noise)
    call = net.calls[0]
    assert call["x"].is_contiguous(memory_format=fmt) and call["lowres"].is_contiguous(memory_format=fmt)
    assert call["text_emb"].is_contiguous()
    assert net.weight.is_contiguous()  # the weights are never touched


def test_no_memory_format_keeps_the_given_one():
    net = _Spy()
    x, noise, emb, mask = _args(lowres=False)
    NetworkCaller(net)(x.contiguous(memory_format=torch.channels_last), noise, emb, mask)
    assert net.calls[0]["x"].is_contiguous(memory_format=torch.channels_last)


def test_autocast_runs_the_network_under_autocast_with_float32_weights():
    net = _Spy(torch.float32)
    x, noise, emb, mask = _args(lowres=False)
    out = NetworkCaller(net, autocast=torch.bfloat16)(x, noise, emb, mask)
    call = net.calls[0]
    assert call["autocast"] and call["autocast_dtype"] == torch.bfloat16
    assert call["x"].dtype == torch.float32  # autocast does the casting, not the caller
    assert out.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # only around the network


def test_conditioning_casts_are_reused_only_when_asked_and_only_for_the_same_tensors():
    x, noise, emb, mask, low, low_noise = _args()
    for cache in (True, False):
        net = _Spy(torch.bfloat16)
        caller = NetworkCaller(net, cache_conditioning=cache)
        caller(x, noise, emb, mask, low, low_noise)
        caller(x.clone(), noise, emb, mask, low, low_noise)
        first, second = net.calls
        assert (second["text_emb"] is first["text_emb"]) == cache
        assert (second["lowres"] is first["lowres"]) == cache
        assert second["x"] is not first["x"]  # the image is new at every step and never cached
        caller(x, noise, emb.clone(), mask, low.clone(), low_noise)  # new tensors: fresh casts
        third = net.calls[2]
        assert third["text_emb"] is not first["text_emb"] and torch.equal(third["text_emb"], first["text_emb"])
        assert third["lowres"] is not first["lowres"]


def test_as_caller_keeps_a_caller_and_wraps_anything_else():
    net = _Spy()
    caller = NetworkCaller(net, dtype=torch.float64)
    assert as_caller(caller) is caller
    wrapped = as_caller(net)
    assert isinstance(wrapped, NetworkCaller) and wrapped.net is net and wrapped.dtype == torch.float32


@pytest.mark.parametrize("formulation", ["edm", "continuous"])
def test_the_loss_and_the_sampler_call_the_network_through_the_given_caller(formulation):
    """A caller handed to the diffusion code is used as is: no second adapter stacked on it."""
    diffusion = build_diffusion(DiffusionConfig(formulation=formulation))
    net = _Spy(torch.float32)
    caller = NetworkCaller(net, memory_format=torch.channels_last)  # the default caller keeps NCHW
    x, _, emb, mask = _args(lowres=False)
    loss = diffusion.training_loss(caller, x, emb, mask)
    assert loss.dtype == torch.float32
    assert net.calls[-1]["x"].is_contiguous(memory_format=torch.channels_last)
    cfg = SamplerConfig(name="edm_heun", steps=2, guidance_scale=2.0)
    diffusion.sample(caller, (2, 3, 8, 8), emb, mask, cfg)
    assert net.calls[-1]["x"].is_contiguous(memory_format=torch.channels_last)
    assert len(net.calls) == 1 + 3  # Heun: 2N - 1 forward passes


def test_sampling_runs_channels_last_on_a_cpu_and_gives_the_same_images():
    """The cascade's caller (Precision.caller) hands a CPU network channels_last images, and the
    samples match those drawn in the contiguous format; on a GPU the format is left as given."""
    from imagen_train.diffusion.caller import sampling_memory_format
    from imagen_train.evaluation.cascade import Precision

    assert sampling_memory_format(torch.device("cpu")) == torch.channels_last
    assert sampling_memory_format(torch.device("cuda")) is None
    net = _Spy()
    caller = Precision(32, torch.device("cpu")).caller(net)
    x, noise, emb, mask, low, low_noise = _args()
    out = caller(x, noise, emb, mask, low, low_noise)
    assert net.calls[-1]["x"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, NetworkCaller(net)(x, noise, emb, mask, low, low_noise))
