"""What the trainer does about updates the engine skipped for non-finite gradients.

A non-finite loss or gradient on any rank makes the reduced gradients non-finite on every rank,
and the engine skips the update on every rank alike (`Engine.step` returns False: weights,
optimizer state and LR schedule untouched). The trainer then redoes the step with new data and
new noise (`trainer.noise_seed` counts the attempts: `in_a_row`). After
`training.max_bad_steps` skipped updates in a row the run stops, naming the last good
checkpoint; so does an update with a non-finite gradient norm that went through anyway, whose
weights are lost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from imagen_train.utils import dist


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite losses); the last good checkpoint stays."""


class BadSteps:
    """Counts skipped updates: `in_a_row` (saved in checkpoints, part of the noise seed) and
    `skipped_total` (this process's, logged as train/skipped_total)."""

    def __init__(self, max_in_a_row: int, zero_stage: int, last_checkpoint: Callable[[], Optional[Path]]):
        self.max_in_a_row = max_in_a_row
        self.zero_stage = zero_stage
        self.last_checkpoint = last_checkpoint
        self.in_a_row = 0
        self.skipped_total = 0

    def skipped(self, step: int, nonfinite_loss: bool) -> None:
        """Count a skipped update of `step` (the same on every rank); stop after too many in a row.
        `nonfinite_loss`: a loss was not finite on some rank (else only a gradient was)."""
        self.in_a_row += 1
        self.skipped_total += 1
        cause = "loss" if nonfinite_loss else "gradient"
        dist.print0(f"[train] non-finite {cause} at step {step}; the update was skipped on every rank "
                    f"({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"{self.in_a_row} non-finite losses in a row (losses or gradients; training.max_bad_steps="
                f"{self.max_in_a_row}); the last good checkpoint is {self.last_checkpoint()}")

    def applied(self, step: int, grad_norm: Optional[float]) -> None:
        """After an applied update of `step`: stop if its gradient norm was not finite (the
        weights are lost), else start counting again."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingStopped(f"a non-finite gradient (norm {grad_norm}) was applied at step {step} "
                                  f"(ZeRO stage {self.zero_stage} does not skip it); the last good "
                                  f"checkpoint is {self.last_checkpoint()}")
        self.in_a_row = 0
