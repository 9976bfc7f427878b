"""The one way the diffusion code calls a network: dtype, memory format, autocast, fp32 noise levels.

The preconditioners call every network through a `NetworkCaller`. Given a bare module they wrap
it in one that runs it in its parameters' dtype; the trainer, periodic evaluation, the cascade
and the benchmarks build theirs with the settings they need and hand that in instead:

    caller = NetworkCaller(net, dtype=torch.bfloat16, memory_format=torch.channels_last)
    loss = diffusion.training_loss(caller, images, text_emb, text_mask)

The network's call signature is CONTRACTS.md's:
    net(x, noise_cond, text_emb, text_mask, lowres=None, lowres_noise_cond=None) -> (B, C, H, W)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def parameter_dtype(net: Callable) -> Optional[torch.dtype]:
    """The floating dtype of a module's parameters (None for plain callables or no parameters)."""
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def sampling_memory_format(device: torch.device) -> Optional[torch.memory_format]:
    """The memory format images are sampled in: channels_last on a CPU, where the convolutions
    of the 1024 px stage run 1.5x faster in it (docs/benchmarks.md, "Sampling in channels_last
    on a CPU"); on a GPU the images' own (contiguous), the format its figures were measured in."""
    return torch.channels_last if device.type == "cpu" else None


class NetworkCaller:
    """`net` as the diffusion code calls it.

    - Images, text embeddings and low-res images go in as `dtype` (None: the module's parameter
      dtype; a plain callable with no dtype gets its inputs as given). Under `autocast` the
      weights are float32 and autocast does the casting.
    - Images (4-D) also go in as `memory_format` (None keeps theirs). Convolution kernels pick
      channels_last when their input is, so every activation and its gradient follow.
    - Noise levels always go in as float32: the network's sinusoidal features reach frequency
      1000, which bf16 cannot resolve (a bf16 level puts the embedding ~19% off).
    - The output comes back in x's dtype (float32 in the loss and the samplers), so the
      diffusion arithmetic around the network never runs in half precision.
    - `cache_conditioning`: the text embeddings and low-res image are the same tensors at every
      step of a sampling run, so their casts are kept and reused while the caller passes those
      very tensors again (off in training, where every call brings a new batch).
    """

    def __init__(self, net: Callable, dtype: Optional[torch.dtype] = None,
                 memory_format: Optional[torch.memory_format] = None, autocast: Optional[torch.dtype] = None,
                 cache_conditioning: bool = False):
        self.net = net
        self.dtype = parameter_dtype(net) if dtype is None else dtype
        self.memory_format = memory_format
        self.autocast = autocast
        self.cache_conditioning = cache_conditioning
        self._casts: dict[str, tuple[Tensor, Tensor]] = {}  # argument -> (given tensor, its cast)

    def _to_network(self, v: Optional[Tensor], name: Optional[str] = None) -> Optional[Tensor]:
        """`v` in the network's dtype and, if 4-D, memory format; None stays None."""
        if v is None:
            return None
        if name is not None and name in self._casts and self._casts[name][0] is v:
            return self._casts[name][1]
        dtype = self.dtype if v.is_floating_point() else None
        fmt = self.memory_format if v.dim() == 4 else None
        out = v
        if dtype is not None or fmt is not None:
            out = v.to(dtype=dtype, memory_format=fmt or torch.preserve_format)
        if name is not None and self.cache_conditioning:
            self._casts[name] = (v, out)
        return out

    def _context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def __call__(self, x: Tensor, noise_cond: Tensor, text_emb: Tensor, text_mask: Tensor,
                 lowres: Optional[Tensor] = None, lowres_noise_cond: Optional[Tensor] = None) -> Tensor:
        """The network's output (B, C, H, W) in x's dtype; noise levels (B,) reach it in float32."""
        with self._context(x.device):
            out = self.net(self._to_network(x), noise_cond.float(), self._to_network(text_emb, "text_emb"),
                           text_mask, lowres=self._to_network(lowres, "lowres"),
                           lowres_noise_cond=None if lowres_noise_cond is None else lowres_noise_cond.float())
        return out.to(x.dtype)


def as_caller(net: Callable) -> NetworkCaller:
    """`net` itself if it already is a NetworkCaller, else the default caller for it."""
    return net if isinstance(net, NetworkCaller) else NetworkCaller(net)
