"""The fused GroupNorm -> FiLM -> SiLU region (imagen_train/models/norm_act.py) and GroupNorm32 on
half-precision inputs (imagen_train/models/layers.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imagen_train.models.layers import GroupNorm32, ResBlock
from imagen_train.models.norm_act import fused_applies, fused_norm_film_silu, norm_film_silu

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
    assert torch.autograd.gradcheck(lambda *a: fused_norm_film_silu(*a, 4, 1e-5), (x, weight, bias, scale, shift))


def _run(mode, inputs, groups=8):
    norm = GroupNorm32(groups, inputs[0].shape[1])
    with torch.no_grad():
        norm.weight.copy_(inputs[1])
        norm.bias.copy_(inputs[2])
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    x, _, _, scale, shift = leaves
    out = norm_film_silu(norm, x, scale, shift, fused=mode)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = [x.grad, norm.weight.grad, norm.bias.grad] + [t.grad for t in (scale, shift) if t is not None]
    return out, grads


@pytest.mark.parametrize("film", [True, False])
def test_fused_equals_composed(film):
    fmt = torch.channels_last
    inputs = _inputs(3, 16, 64, fmt, film=film)
    assert fused_applies(inputs[0], GroupNorm32(8, 16))
    out_f, grads_f = _run("auto", inputs)
    out_c, grads_c = _run("never", inputs)
    torch.testing.assert_close(out_f, out_c, rtol=1e-5, atol=1e-5)
    assert len(grads_f) == len(grads_c) == (5 if film else 3)
    for gf, gc in zip(grads_f, grads_c):
        torch.testing.assert_close(gf, gc, rtol=1e-4, atol=1e-4)
    assert grads_f[0].is_contiguous(memory_format=fmt)


def test_fused_keeps_only_the_input_for_backward():
    """The composition keeps three full-size tensors for backward, the fused region one."""
    def saved_full_size(mode):
        x, weight, bias, scale, shift = _inputs(2, 16, 64, torch.channels_last)
        norm = GroupNorm32(8, 16)
        count = 0

        def pack(t):
            nonlocal count
            count += t.numel() == x.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm_film_silu(norm, x, scale, shift, fused=mode)
        return count
    assert saved_full_size("auto") == 1
    assert saved_full_size("never") >= 3


def test_composed_where_fused_does_not_apply():
    norm = GroupNorm32(8, 16)
    big = torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last)  # 2**16 per sample
    assert fused_applies(big, norm)
    assert not fused_applies(big.contiguous(), norm)  # NCHW: PyTorch's GroupNorm backward is fast there
    assert not fused_applies(big[:, :, :32], norm)  # small maps: the composition is faster
    assert not fused_applies(big.bfloat16(), norm)  # GPU-style precisions keep the composition
    assert not fused_applies(big.to("meta"), norm)  # any non-CPU device
    assert not fused_applies(big, norm, "never")
    bf16 = _inputs(2, 16, 64, torch.channels_last, torch.bfloat16)
    out = norm_film_silu(norm.bfloat16(), *[bf16[0], bf16[3], bf16[4]])
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == "SiluBackward0"


def test_always_fuses_every_affine_map_and_refuses_unknown_modes():
    norm = GroupNorm32(8, 16)
    small = torch.randn(2, 16, 8, 8)  # contiguous and small: "auto" composes
    assert not fused_applies(small, norm) and fused_applies(small, norm, "always")
    assert fused_applies(small.bfloat16(), norm, "always")
    assert not fused_applies(small, torch.nn.GroupNorm(8, 16, affine=False), "always")  # needs the weights
    out = norm_film_silu(norm, small.requires_grad_(), fused="always")
    assert out.grad_fn.name() == "_NormFiLMSiLUBackward"
    torch.testing.assert_close(out, norm_film_silu(norm, small, fused="never"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown fused"):
        fused_applies(small, norm, "sometimes")
    with pytest.raises(ValueError, match="unknown fused"):
        ResBlock(16, 16, 4, num_groups=8, fused_norm_act="yes")


def test_resblock_is_unchanged_by_the_fused_path():
    torch.manual_seed(0)
    block = ResBlock(16, 32, 24, num_groups=8)
    assert block.fused_norm_act == "never"  # plain PyTorch unless set from outside (speedups.apply_fused_norm)
    torch.nn.init.normal_(block.conv2.weight, std=0.05)  # zero-initialised: would hide its input's gradient
    x = torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last)
    assert fused_applies(x, block.norm1)
    emb = torch.randn(2, 24)
    graphs = {}

    def run(mode):
        block.fused_norm_act = mode
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = block(xi, emb)
        graphs[mode] = _graph_names(out)
        out.square().mean().backward()
        return [out, xi.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(run("auto"), run("never")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The module's option, not a process-wide switch, decides the path.
    assert "_NormFiLMSiLUBackward" in graphs["auto"] and "_NormFiLMSiLUBackward" not in graphs["never"]


def _graph_names(out: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `out`."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo += [n for n, _ in node.next_functions]
    return names


def test_always_in_bf16_matches_the_composition_within_bf16_rounding():
    """Outside the measured CPU float32 path the statistics come from var_mean over a grouped view
    (no normalised copy written); in bf16 the result stays within bf16's rounding of the composed
    region, values and gradients."""
    inputs = _inputs(2, 16, 16, torch.channels_last, torch.bfloat16)
    results = {}
    for mode in ("always", "never"):
        norm = GroupNorm32(8, 16).bfloat16()  # a bf16 network's weights
        with torch.no_grad():
            norm.weight.copy_(inputs[1])
            norm.bias.copy_(inputs[2])
        leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4])]
        out = norm_film_silu(norm, *leaves, fused=mode)
        grads = torch.autograd.grad(out, leaves + [norm.weight, norm.bias], torch.ones_like(out))
        results[mode] = out, grads
    (out_f, grads_f), (out_c, grads_c) = results["always"], results["never"]
    assert out_f.dtype == torch.bfloat16 and out_f.grad_fn.name() == "_NormFiLMSiLUBackward"
    scale = out_c.float().abs().max()
    assert (out_f.float() - out_c.float()).abs().max() <= 2**-6 * scale  # 2 bf16 ulps of the largest value
    for gf, gc in zip(grads_f, grads_c):
        assert (gf.float() - gc.float()).abs().max() <= 2**-4 * gc.float().abs().max()


# ----------------------------------------------------------------------------------------------
# GroupNorm32 on bf16/fp16 input: float32 statistics without a float32 copy of the input.

class _BigFloat32(TorchDispatchMode):
    """Records every operator whose output is a float32 tensor of at least `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append(str(func))
        return out


def _norm(dtype, groups=8, channels=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = GroupNorm32(groups, channels)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=gen))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm_on_half_input_makes_no_float32_copy_and_keeps_fp32_accuracy(dtype):
    """Within one rounding of the output's dtype of the float64 reference, as the float32-copy path
    is (stated tolerance: 2 ulps of the largest output for the values, 4 for the input gradient),
    while neither forward nor backward writes a full-size float32 tensor and autograd keeps the
    half-precision input, not a float32 copy, for backward."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 32, 16, 16, generator=gen) * 3 + 2).to(dtype)  # an offset mean: variance needs fp32
    grad = torch.randn(4, 32, 16, 16, generator=gen).to(dtype)
    norm = _norm(dtype)
    ref_x = x.double().requires_grad_()
    ref = F.group_norm(ref_x, 8, norm.weight.double(), norm.bias.double(), norm.eps)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad.double())
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    results = {}
    for upcast in (False, True):
        norm.upcast_input = upcast
        xi = x.clone().requires_grad_()
        watch = _BigFloat32(x.numel())
        saved = []
        with watch, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = norm(xi)
            (x_grad,) = torch.autograd.grad(out, xi, grad)
        assert out.dtype == dtype and x_grad.dtype == dtype
        results[upcast] = watch.seen, saved
        assert (out.double() - ref.detach()).abs().max() <= 2 * ulp * ref.abs().max(), upcast
        assert (x_grad.double() - ref_grad).abs().max() <= 4 * ulp * ref_grad.abs().max(), upcast
    copies_now, saved_now = results[False]
    copies_before, saved_before = results[True]
    assert copies_now == [] and copies_before  # the old path wrote float32 maps; the new one none
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved_now)
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved_before)


def test_groupnorm_float32_path_is_unchanged():
    """Float32 inputs (the CPU configs, the golden loss) run exactly as before: F.group_norm itself."""
    norm = _norm(torch.float32)
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(norm(x), F.group_norm(x, 8, norm.weight, norm.bias, norm.eps))


def test_groupnorm_keeps_the_copy_for_channels_last_half_maps_on_a_cpu():
    """PyTorch's CPU mixed-type kernel on channels_last bf16 maps measured 2-15x slower than the copy
    (docs/benchmarks.md), so those keep it; contiguous ones do not."""
    norm = _norm(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16)
    assert norm._copies(x.contiguous(memory_format=torch.channels_last)) and not norm._copies(x)
    assert norm._copies(x.float())  # float32: the float32 path (a no-op copy)
    torch.testing.assert_close(norm(x.contiguous(memory_format=torch.channels_last)), norm(x), rtol=0.02, atol=0.02)
