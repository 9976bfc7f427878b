"""The fused GroupNorm -> FiLM -> SiLU region (imagen_train/models/norm_act.py)."""

from __future__ import annotations

import pytest
import torch

from imagen_train.models.layers import GroupNorm32, ResBlock
from imagen_train.models.norm_act import _NormFiLMSiLU, fused_applies, fused_norm_act, norm_film_silu

FORMATS = [torch.contiguous_format, torch.channels_last]


def _inputs(batch, channels, size, fmt, dtype=torch.float32, film=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, size, size, generator=gen, dtype=dtype) * 3 + 1).contiguous(memory_format=fmt)
    weight = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    scale = torch.randn(batch, channels, 1, 1, generator=gen, dtype=dtype) * 0.5 if film else None
    shift = torch.randn(batch, channels, 1, 1, generator=gen, dtype=dtype) if film else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, bias, scale, shift)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("film", [True, False])
def test_gradients_match_finite_differences(fmt, film):
    x, weight, bias, scale, shift = _inputs(2, 8, 3, fmt, torch.float64, film)
    assert torch.autograd.gradcheck(lambda *a: _NormFiLMSiLU.apply(*a, 4, 1e-5), (x, weight, bias, scale, shift))


def _run(enabled, inputs, groups=8):
    norm = GroupNorm32(groups, inputs[0].shape[1])
    with torch.no_grad():
        norm.weight.copy_(inputs[1])
        norm.bias.copy_(inputs[2])
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    x, _, _, scale, shift = leaves
    with fused_norm_act(enabled):
        out = norm_film_silu(norm, x, scale, shift)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = [x.grad, norm.weight.grad, norm.bias.grad] + [t.grad for t in (scale, shift) if t is not None]
    return out, grads


@pytest.mark.parametrize("film", [True, False])
def test_fused_equals_composed(film):
    fmt = torch.channels_last
    inputs = _inputs(3, 16, 64, fmt, film=film)
    assert fused_applies(inputs[0], GroupNorm32(8, 16))
    out_f, grads_f = _run(True, inputs)
    out_c, grads_c = _run(False, inputs)
    torch.testing.assert_close(out_f, out_c, rtol=1e-5, atol=1e-5)
    assert len(grads_f) == len(grads_c) == (5 if film else 3)
    for gf, gc in zip(grads_f, grads_c):
        torch.testing.assert_close(gf, gc, rtol=1e-4, atol=1e-4)
    assert grads_f[0].is_contiguous(memory_format=fmt)


def test_fused_keeps_only_the_input_for_backward():
    """The composition keeps three full-size tensors for backward, the fused region one."""
    def saved_full_size(enabled):
        x, weight, bias, scale, shift = _inputs(2, 16, 64, torch.channels_last)
        norm = GroupNorm32(8, 16)
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel() == x.numel()
            return t
        with fused_norm_act(enabled), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm_film_silu(norm, x, scale, shift)
        return count
    assert saved_full_size(True) == 1
    assert saved_full_size(False) >= 3


def test_composed_where_fused_does_not_apply():
    norm = GroupNorm32(8, 16)
    big = torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last)  # 2**16 per sample
    assert fused_applies(big, norm)
    assert not fused_applies(big.contiguous(), norm)  # NCHW: PyTorch's GroupNorm backward is fast there
    assert not fused_applies(big[:, :, :32], norm)  # small maps: the composition is faster
    assert not fused_applies(big.bfloat16(), norm)  # GPU-style precisions keep the composition
    assert not fused_applies(big.to("meta"), norm)  # any non-CPU device
    with fused_norm_act(False):
        assert not fused_applies(big, norm)
    assert fused_applies(big, norm)  # the switch is restored on exit
    bf16 = _inputs(2, 16, 64, torch.channels_last, torch.bfloat16)
    out = norm_film_silu(norm.bfloat16(), *[bf16[0], bf16[3], bf16[4]])
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == "SiluBackward0"


def test_resblock_is_unchanged_by_the_fused_path():
    torch.manual_seed(0)
    block = ResBlock(16, 32, 24, num_groups=8)
    torch.nn.init.normal_(block.conv2.weight, std=0.05)  # zero-initialised: would hide its input's gradient
    x = torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last)
    assert fused_applies(x, block.norm1)
    emb = torch.randn(2, 24)

    def run(enabled):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        with fused_norm_act(enabled):
            out = block(xi, emb)
        out.square().mean().backward()
        return [out, xi.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
