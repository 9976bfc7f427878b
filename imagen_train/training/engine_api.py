"""What the trainer asks of a training engine: the whole of its contact with DeepSpeed.

The trainer calls the network through the engine, hands it each micro batch's loss, asks it to
apply the accumulated update and whether it did, reads the gradient norm, learning rate and loss
scale for the log, gives the EMA the engine's fp32 master weights, and saves and loads the
engine's part of a checkpoint. How the engine shards, scales or skips is its own business:
`training/engine.py` is the one implementation, on DeepSpeed; the tests wrap it from outside
(tests/hooks/faults.py) to inject faults.

The EMA follows the fp32 master weights where the optimizer keeps them: each rank holds a slice
[start, end) of every flattened parameter (ZeRO's partition; an equal part where every rank
holds everything), so `master_layout` gives the bounds and `master_weights` views of the slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

# Per parameter, in the network's order: {"shape": full shape, "numel": elements, "start": ...,
# "end": ...}, where [start, end) is the part of the flattened parameter this rank's slice covers.
MasterLayout = dict[str, dict[str, Any]]


class Engine(Protocol):
    """A network under data-parallel training with its optimizer and LR schedule, on every rank."""

    device: torch.device          # where batches go
    dtype: torch.dtype            # the network's compute dtype (float32, bfloat16 or float16)
    accum_steps: int              # micro batches per optimizer step on each rank

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The network's forward pass (CONTRACTS.md's signature)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro batch's loss (averaged over micro batches and ranks)."""

    def step(self) -> bool:
        """Apply the accumulated update after the last micro batch of a step; the same answer on
        every rank: True if applied, False if skipped because the gradients were not finite
        (weights, optimizer state and LR schedule then untouched)."""

    def grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step, before clipping; None if not computed."""

    def lr(self) -> float:
        """The learning rate the next update will use."""

    def loss_scale(self) -> Optional[float]:
        """The dynamic loss scale (fp16), else None."""

    def master_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, flat fp32 tensor) of this rank's master slices, in `master_layout`'s order:
        views the optimizer updates in place (fetch them again after a load)."""

    def master_layout(self) -> MasterLayout:
        """The bounds of this rank's master slices (the ranks' slices tile every parameter)."""

    def set_master_weights(self, read: Callable[[str], torch.Tensor]) -> None:
        """Overwrite this rank's master slices with the full fp32 tensors `read(name)` returns."""

    def optimizer_layout(self) -> Optional[dict[str, Any]]:
        """Where this rank's optimizer keeps each parameter in its files, recorded in every rank's
        checkpoint state so that another layout can re-slice it; None if it cannot be re-sliced."""

    def save(self, folder: Path) -> None:
        """Write this rank's part of a checkpoint (weights, optimizer, LR schedule) into `folder`."""

    def load(self, folder: Path) -> None:
        """Load a checkpoint written by this same layout (world size, ZeRO stage): exact."""

    def load_resharded(self, folder: Path, layouts: list[dict[str, Any]]) -> dict[str, int]:
        """Load a checkpoint written by another layout, given every old rank's `optimizer_layout`;
        returns what this rank read (files, metadata and tensor bytes)."""

    def describe(self) -> str:
        """One line for the log: the optimizer and how it is wrapped."""

    def config_files(self) -> dict[str, dict[str, Any]]:
        """The engine's own settings as file name -> JSON content, written into the run folder."""
