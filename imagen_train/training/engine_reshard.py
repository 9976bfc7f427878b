"""Resuming onto another world size or ZeRO stage: DeepSpeed's optimizer state, re-sliced.

What re-slicing must know of DeepSpeed's optimizers and checkpoint files (their flat fp32
tensors, file names and keys, step counters, and how to relink the module's weights) is in
training/deepspeed_internals.py, where tests/test_resume_reshard.py checks every item by name;
this module is the re-slicing itself, on plain tensors and dictionaries.

At every save each rank records where its optimizer keeps each parameter (`optimizer_layout`):
which elements of the flattened parameter, at which offset of which flat fp32 tensor, in which
of its DeepSpeed files. A resume at another layout (`load_resharded`) then fills every element
the new rank owns from the old ranks that held it: the fp32 master and every optimizer state
tensor with one value per element (Adam's exp_avg and exp_avg_sq) are copied out of the old
files, memory-mapped so that only those bytes are read; Adam's step count, the LR schedule and
DeepSpeed's step counters are taken as saved; the module's weights then follow the masters.
Why this and not DeepSpeed's universal checkpoint: docs/design-notes.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from imagen_train.artifacts.checkpoints import CheckpointError, pickled_bytes
from imagen_train.training.deepspeed_internals import (fp32_flats, master_slices, optimizer_kind, rank_files,
                                                       refresh_low_precision, relink_masters, restore_schedule,
                                                       saved_optimizer, torch_optimizer, zero0_masters)
from imagen_train.utils import dist

LAYOUT_VERSION = 1
# Fragment of one parameter on one rank: (name, start, end, flat index, offset); see optimizer_fragments.
Fragment = tuple[str, int, int, int, int]


def _locate(view: torch.Tensor, flats: list[torch.Tensor]) -> tuple[int, int]:
    """(index, element offset) of the flat tensor that `view` is a view of."""
    for index, flat in enumerate(flats):
        offset, size = view.data_ptr() - flat.data_ptr(), flat.element_size()
        if flat.dtype == view.dtype and offset >= 0 and offset // size + view.numel() <= flat.numel():
            return index, offset // size
    raise RuntimeError("an fp32 master slice is not a view of the optimizer's fp32 tensors: DeepSpeed's "
                       "layout changed (tests/test_resume_reshard.py checks it)")


def optimizer_fragments(engine) -> list[Fragment]:
    """Where this rank's optimizer keeps each parameter: (name, start, end, flat index, offset).

    Elements [start, end) of the flattened parameter sit at [offset, offset + end - start) of
    `fp32_flats(engine)[flat index]` and of its optimizer state tensors. ZeRO 1-3 hold this
    rank's master slice (`master_slices`); ZeRO-0 holds every parameter on every rank.
    """
    flats = fp32_flats(engine)
    if engine.zero_optimization_stage() == 0:
        masters = zero0_masters(engine)
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        return [(n, 0, p.numel(), *_locate(masters(p).reshape(-1), flats)) for n, p in named]
    return [(name, start, end, *_locate(get().reshape(-1), flats))
            for name, _, start, end, get in master_slices(engine) if end > start]


def optimizer_layout(engine) -> Optional[dict[str, Any]]:
    """What each rank's checkpoint state records so that another layout can re-slice it; None
    (said in the log) for an optimizer this module does not know: the run trains and resumes on
    its own layout as before, only not onto another one."""
    try:
        return {"version": LAYOUT_VERSION, "kind": optimizer_kind(engine),
                "zero_stage": engine.zero_optimization_stage(), "files": rank_files(engine),
                "params": {name: [start, end, flat, offset]
                           for name, start, end, flat, offset in optimizer_fragments(engine)}}
    except (RuntimeError, AttributeError) as err:
        dist.print0(f"[train] this run's checkpoints cannot be resumed onto another world size or ZeRO "
                    f"stage: {err}")
        return None


def _state_for(engine, flat_index: int, saved: dict[str, Any]) -> dict[str, Any]:
    """The torch optimizer's state of flat `flat_index`, made like `saved` (one flat's saved
    state): per-element tensors kept (zeros where the optimizer has not stepped yet), the rest
    (Adam's step) set to the saved value, on the device where torch's Adam keeps it. Some
    wrappers step once at start-up (DeepSpeed's FP16_UnfusedOptimizer), so state may exist."""
    opt, flat = torch_optimizer(engine), fp32_flats(engine)[flat_index]
    state = opt.state[flat]
    group = opt.param_groups[0] if opt.param_groups else {}
    on_device = bool(group.get("fused") or group.get("capturable"))  # torch's Adam(W) _init_group
    for key, value in saved.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        elif torch.is_tensor(value):
            device = state[key].device if torch.is_tensor(state.get(key)) else (flat.device if on_device else "cpu")
            state[key] = value.clone().to(device)
        else:
            state[key] = value
    return state


class _MappedFiles:
    """DeepSpeed files of a checkpoint, each loaded once, memory-mapped: a tensor's bytes are read
    only where a slice of it is copied. Counts what it reads."""

    def __init__(self, folder: Path):
        self.folder, self.files = folder, {}
        self.read = {"files": 0, "metadata_bytes": 0, "tensor_bytes": 0}

    def get(self, name: str) -> dict[str, Any]:
        if name not in self.files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the checkpoint's layout record names it")
            self.read["metadata_bytes"] += pickled_bytes(path)  # read whole; tensors only where sliced
            # DeepSpeed's own files hold pickled objects (as DeepSpeed's loader, weights_only=False):
            # read only after the folder verified against its manifest (docs/fault-tolerance.md).
            self.files[name] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            self.read["files"] += 1
        return self.files[name]

    def counted(self, tensor: torch.Tensor) -> torch.Tensor:
        self.read["tensor_bytes"] += tensor.numel() * tensor.element_size()
        return tensor


def sources(name: str, start: int, end: int, layouts: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(old rank, lo, hi): the old ranks whose saved elements cover [start, end) of `name`, the
    first holder of an element winning (under ZeRO-0 every rank held everything)."""
    held = sorted((entry[0], entry[1], rank) for rank, layout in enumerate(layouts)
                  if (entry := layout["params"].get(name)) is not None and entry[1] > entry[0])
    if not held:
        raise CheckpointError(f"parameter '{name}' is not in the checkpoint: another network?")
    pieces, covered = [], start
    for lo, hi, rank in held:
        if covered >= end:
            break
        if hi <= covered:
            continue
        if lo > covered:
            break
        pieces.append((rank, covered, min(hi, end)))
        covered = min(hi, end)
    if covered < end:
        raise CheckpointError(f"the checkpoint's slices of '{name}' leave elements {covered}..{end} uncovered")
    return pieces


@torch.no_grad()
def load_resharded(engine, folder: Path, layouts: list[dict[str, Any]]) -> dict[str, int]:
    """Fill this rank's optimizer (fp32 masters, per-element state, step), LR schedule and step
    counters from a checkpoint written by `len(layouts)` ranks with the given layouts (each old
    rank's `optimizer_layout`), then bring the module's weights in line. Call on every rank.
    Returns what this rank read: files, metadata bytes, tensor bytes."""
    files, flats = _MappedFiles(folder), fp32_flats(engine)
    steps = set()
    for name, start, end, flat_index, offset in optimizer_fragments(engine):
        for rank, lo, hi in sources(name, start, end, layouts):
            old = layouts[rank]
            old_start, _, old_flat, old_offset = old["params"][name]
            masters, states = saved_optimizer(old["kind"], files.get(old["files"]["optimizer"]))
            src = slice(old_offset + lo - old_start, old_offset + hi - old_start)
            dst = slice(offset + lo - start, offset + hi - start)
            flats[flat_index].view(-1)[dst].copy_(files.counted(masters(old_flat, name).reshape(-1)[src]))
            saved = states[old_flat]
            mine = _state_for(engine, flat_index, saved)
            for key, value in saved.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    mine[key].view(-1)[dst].copy_(files.counted(value.reshape(-1)[src]))
                elif key == "step":
                    steps.add(float(value))
    if len(steps) > 1:
        raise CheckpointError(f"{folder}: the ranks' optimizer states disagree on Adam's step ({sorted(steps)})")
    relink_masters(engine)
    restore_schedule(engine, files.get(layouts[0]["files"]["model"]))
    refresh_low_precision(engine)
    dist.barrier()
    return files.read
