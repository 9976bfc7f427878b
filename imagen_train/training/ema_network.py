"""The EMA network for periodic evaluation, built from the slices the ranks keep.

Training owns the layout of the EMA (each rank keeps the EMA of its slice of every flattened
parameter: `Engine.master_layout`, training/engine_api.py), so training turns it into a network and hands
the evaluator a callable, `materialize_ema(dtype, device) -> nn.Module`; the evaluator never
sees slices, bounds or ZeRO stages.

One gather of the flat EMA. A rank's flat EMA is the concatenation of its slices, in the
network's parameter order. Every rank's flat EMA is padded to the longest one (L elements) and
all-gathered in windows of `window_bytes` in all (w = window_bytes / (world x element size)
elements per rank and window), so the receive buffer stays bounded whatever the model and
world size. Every rank sends its L elements once, in the sampling dtype, and receives
(world - 1) x L of the others': about one model in that dtype (sum of the L_r = the model's
elements; the padding is world x (L - mean L_r), at most one element per rank per parameter
when ZeRO-3 or ZeRO-0 cuts each parameter in equal parts). The per-parameter gather this
replaced padded every slice to the widest slice of its parameter: under ZeRO-1/2, where a
parameter usually sits whole on one rank, each rank received about world x model bytes.

No full fp32 copy. The network is built on the meta device, given storage once in the sampling
dtype and filled in place from the gathered windows (the slices are cast while the send
buffer is filled), so building it adds one copy of the network in that dtype plus the window.
A rank places its own slices straight from its EMA (one process: no gather at all). Every
rank's slice bounds are gathered once, checked to tile every parameter
(`artifacts.ema.check_tiling`) and kept for the later evaluations.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor

from imagen_train.artifacts.ema import check_tiling
from imagen_train.config import Config
from imagen_train.models import build_model
from imagen_train.utils import dist

# The receive buffer of one window (all ranks' parts together). 64 MiB keeps a 2B-parameter
# network in bf16 to ~64 collectives per evaluation at any world size.
DEFAULT_WINDOW_BYTES = 64 * 2**20


@dataclass
class FlatLayout:
    """Where one rank's slices sit in its flat EMA: slice k is the elements [offsets[k],
    offsets[k] + end - start) of the flat EMA, and [start, end) of the flattened parameter
    `index` (entries[k] = (index, start, end)); non-empty slices only, in parameter order."""

    offsets: list[int]
    entries: list[tuple[int, int, int]]
    length: int

    @classmethod
    def from_bounds(cls, bounds: list[tuple[int, int]]) -> "FlatLayout":
        """From the rank's [start, end) of every parameter, in parameter order."""
        offsets, entries, length = [], [], 0
        for index, (start, end) in enumerate(bounds):
            if end > start:
                offsets.append(length)
                entries.append((index, start, end))
                length += end - start
        return cls(offsets, entries, length)

    def overlaps(self, begin: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(parameter index, element of the flattened parameter, element of the slice, element
        of the window, count) of every part of the flat EMA's elements [begin, end), in order."""
        for k in range(max(0, bisect_right(self.offsets, begin) - 1), len(self.offsets)):
            offset, (index, start, stop) = self.offsets[k], self.entries[k]
            if offset >= end:
                break
            lo, hi = max(offset, begin), min(offset + stop - start, end)
            if lo < hi:
                yield index, start + lo - offset, lo - offset, lo - begin, hi - lo


def fill_window(window: Tensor, flat: FlatLayout, begin: int, slices: list[Tensor]) -> None:
    """Copy the elements [begin, begin + len(window)) of a rank's flat EMA out of its `slices`
    (flat, one per parameter), cast to the window's dtype; the rest of the window is left as is."""
    for index, _, in_slice, at, count in flat.overlaps(begin, begin + window.numel()):
        window[at:at + count] = slices[index][in_slice:in_slice + count]


def place_window(row: Tensor, flat: FlatLayout, begin: int, params: list[Tensor]) -> None:
    """Write one rank's gathered window `row` (its flat EMA's elements [begin, begin + len(row)))
    into the flattened parameters `params` at that rank's bounds."""
    for index, element, _, at, count in flat.overlaps(begin, begin + row.numel()):
        params[index][element:element + count] = row[at:at + count]


class EMANetwork:
    """`materialize_ema(dtype, device)`: the EMA network on every rank (a collective: every rank
    calls it together). See the module docstring.

    `layout[name]` is this rank's {"shape", "numel", "start", "end"} of each trainable parameter
    (`Engine.master_layout`), in the network's parameter order; `shadow[name]` the EMA of
    that slice, flat, read at each call (the EMA updates it in place).
    """

    def __init__(self, cfg: Config, layout: Mapping[str, dict], shadow: Mapping[str, Tensor],
                 window_bytes: int = DEFAULT_WINDOW_BYTES):
        self.cfg, self.layout, self.shadow = cfg, layout, shadow
        self.names = list(layout)
        self.window_bytes = window_bytes
        self._flat: list[FlatLayout] | None = None  # every rank's, gathered at the first call

    def flat_layouts(self, device: torch.device) -> list[FlatLayout]:
        """Every rank's FlatLayout (one small gather, at the first call only), checked to tile."""
        if self._flat is None:
            bounds = torch.tensor([[self.layout[n]["start"], self.layout[n]["end"]] for n in self.names],
                                  dtype=torch.long, device=device).reshape(-1, 2)
            table = dist.all_gather_equal(bounds).cpu().tolist()          # (world, P, 2)
            for i, name in enumerate(self.names):  # the same table on every rank: all raise alike
                check_tiling(name, int(self.layout[name]["numel"]), [tuple(rows[i]) for rows in table])
            self._flat = [FlatLayout.from_bounds([tuple(b) for b in rows]) for rows in table]
        return self._flat

    @torch.no_grad()
    def __call__(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """The EMA network in `dtype` on `device`, eval mode, no gradients."""
        cfg = self.cfg
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device="meta")
        if next(net.buffers(), None) is not None:
            # Buffers computed at construction would be left uninitialised by to_empty; the
            # networks hold none today, so say so loudly rather than sample with garbage.
            raise RuntimeError(f"{type(net).__name__} has buffers: EMANetwork must recompute them after to_empty")
        net = net.to(dtype).to_empty(device=device).eval().requires_grad_(False)
        named = dict(net.named_parameters())
        if set(self.names) != set(named):
            raise ValueError(f"EMA layout and network differ: {sorted(set(self.names) ^ set(named))[:5]}")
        params = [named[n].view(-1) for n in self.names]
        flats, me = self.flat_layouts(device), dist.rank()
        slices = [self.shadow[n].reshape(-1) for n in self.names]
        for index, start, end in flats[me].entries:  # this rank's own slices need no gather
            params[index][start:end] = slices[index][:end - start]
        if len(flats) == 1:
            return net
        longest = max(f.length for f in flats)                            # L: every rank sends L
        elem_bytes = torch.finfo(dtype).bits // 8
        width = max(1, min(longest, self.window_bytes // (len(flats) * elem_bytes)))
        for begin in range(0, longest, width):
            window = torch.zeros(min(width, longest - begin), dtype=dtype, device=device)
            fill_window(window, flats[me], begin, slices)
            rows = dist.all_gather_equal(window)                           # (world, w)
            for rank, flat in enumerate(flats):
                if rank != me:
                    place_window(rows[rank], flat, begin, params)
            del window, rows
        return net


__all__ = ["DEFAULT_WINDOW_BYTES", "EMANetwork", "FlatLayout", "fill_window", "place_window"]
