"""EMA stitching: the full EMA weights from the slices the ranks keep.

Every rank keeps the EMA of its own slice of each flattened parameter, with the slice's bounds
(`layout[name] = {"shape", "numel", "start", "end"}`); the full tensor is the slices placed at
their bounds (`stitch`), which must tile it (`check_tiling`). Export stitches them from a
checkpoint's rank files (`ema_state_dict`); during training, `training.ema_network` gathers the
live slices into the evaluation network, with the same tiling check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .checkpoints import CheckpointError, read_all_rank_states


def slice_bounds(entry: dict, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that `rank` kept an EMA of.

    Checkpoints record the bounds per rank. Older ones (no 'start' key) cut every parameter in
    equal parts of ceil(numel / world), the last rank's part padded under ZeRO-3.
    """
    if "start" in entry:
        return int(entry["start"]), int(entry["end"])
    numel = int(entry["numel"])
    part = -(-numel // world)
    return min(rank * part, numel), min((rank + 1) * part, numel)


def check_tiling(name: str, numel: int, bounds: list[tuple[int, int]]) -> None:
    """Refuse [start, end) slices of the flat parameter `name` that leave a gap, overlap or
    do not cover its `numel` elements (CheckpointError naming the parameter); empty ones are
    ignored."""
    covered = 0
    for start, end in sorted((s, e) for s, e in bounds if e > s):
        if start != covered:
            raise CheckpointError(f"EMA slices of '{name}' do not tile it: a gap or overlap at "
                                  f"element {covered} (next slice starts at {start})")
        covered = end
    if covered != numel:
        raise CheckpointError(f"EMA slices of '{name}' cover {covered} of its {numel} elements")


def stitch(name: str, numel: int, pieces: list[tuple[int, int, torch.Tensor]],
           dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The flat parameter `name` (numel,) from its ranks' (start, end, slice) pieces.

    Written into `out` (a flat tensor of `numel` elements, cast on the way) when given, else into
    a new tensor in `dtype`. Pieces longer than their bounds (padded slices) are cut; pieces
    that leave a gap or overlap are refused, naming the parameter.
    """
    check_tiling(name, numel, [(start, end) for start, end, _ in pieces])
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=pieces[0][2].device if pieces else "cpu")
    for start, end, piece in pieces:
        if end > start:
            out[start:end] = piece.reshape(-1)[: end - start]
    return out


def ema_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full EMA weights (fp32) of a checkpoint folder, stitched from every rank's slice."""
    states = read_all_rank_states(folder)
    world = len(states)
    out = {}
    for name, entry in states[0]["layout"].items():
        pieces = [(*slice_bounds(s["layout"][name], r, world), s["ema"]["shadow"][name])
                  for r, s in enumerate(states)]
        out[name] = stitch(name, int(entry["numel"]), pieces).reshape(entry["shape"])
    return out


def ema_slices_for(folder: Path, layout: dict[str, dict], states: Optional[list[dict]] = None
                   ) -> dict[str, torch.Tensor]:
    """This rank's EMA slices under `layout`, cut from a checkpoint saved with other bounds.

    For a resume at another world size or ZeRO stage, or of a checkpoint whose EMA was cut in
    equal parts. Only the saved slices that overlap the new bounds are read: pass `states`
    memory-mapped (`read_all_rank_states(folder, mmap=True)`, the default) and each rank reads
    about its own share of the EMA.
    """
    states = read_all_rank_states(folder, mmap=True) if states is None else states
    world = len(states)
    out = {}
    for name, entry in layout.items():
        start, end = int(entry["start"]), int(entry["end"])
        piece, covered = torch.empty(end - start, dtype=torch.float32), 0
        for rank, state in enumerate(states):
            if name not in state["layout"]:
                raise CheckpointError(f"{folder}: rank {rank} kept no EMA of '{name}' (another network?)")
            lo, hi = slice_bounds(state["layout"][name], rank, world)
            a, b = max(lo, start), min(hi, end)
            if a < b:
                piece[a - start:b - start] = state["ema"]["shadow"][name].reshape(-1)[a - lo:b - lo]
                covered += b - a
        if covered != end - start:
            raise CheckpointError(f"EMA slices of '{name}' in {folder} cover {covered} of the {end - start} "
                                  f"elements [{start}, {end}) this rank needs")
        out[name] = piece
    return out
