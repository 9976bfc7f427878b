"""GroupNorm -> optional FiLM -> SiLU as one autograd function: `silu(GN(x) * (1 + scale) + shift)`.

Every ResBlock runs this region twice. Composed from PyTorch ops, autograd keeps three full-size
tensors per region (the GroupNorm input, its output and the pre-activation), its backward makes
about a dozen passes over them, and PyTorch's CPU GroupNorm backward is slow on channels_last
maps. Here the GroupNorm affine and the FiLM scale and shift fold into one per-(sample, channel)
gain and offset, so the forward is `silu(x * gain + offset)`. Only `x` and the (B, groups)
statistics are kept, and the backward recomputes the pre-activation and needs two reductions
over `x` and the incoming gradient.

Where the fused function runs is an option of each module that runs the region (one of
`FUSED_MODES`: ResBlock's and OutputHead's `fused_norm_act`, passed to `norm_film_silu` as `fused`).
The modules default to "never", plain PyTorch; whoever runs the network sets it from outside
(`speedups.apply_fused_norm`; the trainer and bench/train_step.py apply `training.fused_norm`,
default "auto"):
- "auto": channels_last CPU float32 maps of at least `MIN_ELEMENTS` elements per sample, outside
  `torch.compile`, where it measured faster than the composition (docs/benchmarks.md, "The
  GroupNorm -> FiLM -> SiLU region alone"). On smaller maps its extra (B, C)-sized operations cost
  as much as the passes they save; on contiguous maps PyTorch's own GroupNorm backward is fast;
  `torch.compile` fuses the composition itself (the GPU's fused path); GPUs and half precision are
  unmeasured, so they keep the composition too.
- "never": always the composition (bench/train_step.py's `composed-norm` baseline).
- "always": every 4-D map with affine weights, outside `torch.compile`, whatever its device,
  dtype, size or layout (the `fused-norm-everywhere` baseline: would it pay here too?).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ELEMENTS = 2**16  # C * H * W of one sample
FUSED_MODES = ("auto", "never", "always")


def check_fused_mode(mode: str) -> str:
    """`mode` if it is one of FUSED_MODES, else ValueError."""
    if mode not in FUSED_MODES:
        raise ValueError(f"unknown fused GroupNorm -> FiLM -> SiLU mode {mode!r}; expected one of {FUSED_MODES}")
    return mode


def _gain_offset(mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor],
                 shift: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-(sample, group, channel) gain and offset with `GN(x) * (1 + scale) + shift = x * gain + offset`.

    mean, rstd (B, G); weight, bias (C,); scale, shift (B, C, 1, 1) or None -> (B, G, C/G) each.
    """
    b, g = mean.shape
    mean, rstd = mean.view(b, g, 1), rstd.view(b, g, 1)
    gain = rstd * weight.view(1, g, -1)
    offset = torch.addcmul(bias.view(1, g, -1), mean, gain, value=-1.0)
    if scale is not None:
        film = 1 + scale.view(b, g, -1)
        gain, offset = gain * film, offset * film
    if shift is not None:
        offset = offset + shift.view(b, g, -1)
    return gain, offset


def _group_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and 1 / std per (sample, group), (B, G) each, without a normalised copy of x.

    CPU float32 (the measured "auto" path) takes them from PyTorch's GroupNorm kernel, which also
    writes an output that is dropped. Elsewhere `var_mean` over a grouped view (a view in any
    layout) reads x once and writes nothing of its size; its statistics come out in x's dtype
    (bf16/fp16 kernels accumulate in float32), as CUDA's GroupNorm saves them for backward.
    """
    b, c = x.shape[:2]
    if x.device.type == "cpu" and x.dtype == torch.float32:
        _, mean, rstd = torch.native_group_norm(x, None, None, b, c, x.numel() // (b * c), groups, eps)
        return mean, rstd
    var, mean = torch.var_mean(x.view(b, groups, c // groups, *x.shape[2:]), dim=tuple(range(2, x.dim() + 1)),
                               correction=0)
    return mean, (var + eps).rsqrt()


class _NormFiLMSiLU(torch.autograd.Function):
    """The region's forward and a backward that recomputes the pre-activation from `x`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                groups: int, eps: float) -> Tensor:
        b, c = x.shape[:2]
        mean, rstd = _group_stats(x, groups, eps)
        gain, offset = _gain_offset(mean, rstd, weight, bias, scale, shift)
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
        return F.silu(torch.addcmul(offset.view(b, c, 1, 1), x, gain.view(b, c, 1, 1)), inplace=True)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        b, c = x.shape[:2]
        g = mean.shape[1]
        gain, offset = _gain_offset(mean, rstd, weight, bias, scale, shift)
        pre = torch.addcmul(offset.view(b, c, 1, 1), x, gain.view(b, c, 1, 1))
        grad_pre = torch.ops.aten.silu_backward(grad_out, pre)  # d loss / d (GN(x) * (1 + scale) + shift)
        del pre
        sum_grad = grad_pre.sum((2, 3)).view(b, g, -1)  # (B, G, C/G)
        sum_grad_x = (grad_pre * x).sum((2, 3)).view(b, g, -1)
        mean, rstd = mean.view(b, g, 1), rstd.view(b, g, 1)
        sum_grad_xhat = (sum_grad_x - mean * sum_grad) * rstd  # sums of grad_pre * normalised x
        film = None if scale is None else 1 + scale.view(b, g, -1)
        w = weight.view(1, g, -1)

        grad_shift = None if shift is None else sum_grad.reshape(shift.shape)
        grad_scale = None if scale is None else torch.addcmul(sum_grad_xhat * w, sum_grad, bias.view(1, g, -1))
        grad_weight = (sum_grad_xhat if film is None else sum_grad_xhat * film).sum(0).reshape(weight.shape)
        grad_bias = (sum_grad if film is None else sum_grad * film).sum(0).reshape(bias.shape)

        # GroupNorm's input gradient for the incoming gradient grad_pre * k, k = w * (1 + scale):
        # dx = rstd * k * grad_pre + x * c1 + c0, with c1, c0 per (sample, group).
        k = w if film is None else w * film
        positions = x.numel() // (b * c) * (c // g)
        sum_k_grad = (sum_grad * k).sum(-1, keepdim=True)  # (B, G, 1)
        sum_k_grad_x = (sum_grad_x * k).sum(-1, keepdim=True)
        c1 = (sum_k_grad * mean - sum_k_grad_x) * rstd.pow(3) / positions
        c0 = -(c1 * mean + sum_k_grad * rstd / positions)
        grad_x = torch.addcmul(c0.expand(b, g, c // g).reshape(b, c, 1, 1), grad_pre,
                               (k * rstd).expand(b, g, c // g).reshape(b, c, 1, 1))
        grad_x.addcmul_(x, c1.expand(b, g, c // g).reshape(b, c, 1, 1))
        if scale is not None:
            grad_scale = grad_scale.reshape(scale.shape)
        return grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, None


def fused_applies(x: Tensor, norm: nn.GroupNorm, mode: str = "auto") -> bool:
    """Whether `norm_film_silu` takes the fused path for this input in `mode` (see the module docstring)."""
    if check_fused_mode(mode) == "never":
        return False
    runs = x.dim() == 4 and norm.affine and not torch.compiler.is_compiling()
    if mode == "always":
        return runs
    return (runs and x.device.type == "cpu" and x.dtype == torch.float32
            and x.shape[1] * x.shape[2] * x.shape[3] >= MIN_ELEMENTS
            and x.is_contiguous(memory_format=torch.channels_last))


def fused_norm_film_silu(x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                         groups: int, eps: float) -> Tensor:
    """The fused function itself: `silu(group_norm(x, groups, weight, bias, eps) * (1 + scale) + shift)`."""
    return _NormFiLMSiLU.apply(x, weight, bias, scale, shift, groups, eps)


def norm_film_silu(norm: nn.GroupNorm, x: Tensor, scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, fused: str = "auto") -> Tensor:
    """`silu(norm(x) * (1 + scale) + shift)`; scale and shift (B, C, 1, 1), either may be None.

    `norm` is a GroupNorm (GroupNorm32: statistics in float32); the fused path needs its affine
    weights. `fused`: where the fused function runs (FUSED_MODES).
    """
    same_dtype = all(t is None or t.dtype == x.dtype for t in (scale, shift))
    if fused_applies(x, norm, fused) and same_dtype:
        return fused_norm_film_silu(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale)
    if shift is not None:
        h = h + shift
    return F.silu(h)
