"""The training metrics of the steps since the last log line, and the log line itself.

The losses stay on the device until a line is logged, so the loop never waits for it: a step
adds its micro batches' losses as tensors (the non-finite ones counted apart: their update is
skipped), and `log` takes the mean over the window and the ranks once.
"""

from __future__ import annotations

from typing import Optional

import torch

from imagen_train.training.engine_api import Engine
from imagen_train.utils import dist
from imagen_train.utils.logging import MetricLogger


class StepMetrics:
    """Sums over the steps since the last log line; `log` writes one line and starts a new window.

    `add_loss` per micro batch; then `keep_step` (the update was applied) or `drop_step` (it was
    skipped). The loop adds its timings to `data_s` (waiting for batches) and `step_s` (applied
    steps, from the first micro batch to the EMA update).
    """

    def __init__(self, device: torch.device, flops_per_sample: Optional[float], log_every_steps: int):
        self.device = device
        self.flops_per_sample = flops_per_sample
        self.log_every_steps = log_every_steps
        self._new_window()
        self._new_step()

    def _new_window(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.micro = 0
        self.samples = 0
        self.data_s = 0.0
        self.step_s = 0.0

    def _new_step(self) -> None:
        self._step_loss = torch.zeros((), device=self.device)  # sum of this step's finite losses
        self._nonfinite = torch.zeros((), device=self.device)
        self._step_micro = 0
        self._step_samples = 0

    def add_loss(self, loss: torch.Tensor, samples: int) -> None:
        """One micro batch's mean loss, over `samples` samples on all ranks."""
        finite = torch.isfinite(loss.detach())
        self._step_loss += torch.where(finite, loss.detach(), 0.0)
        self._nonfinite += ~finite
        self._step_micro += 1
        self._step_samples += samples

    def keep_step(self) -> None:
        """The step's update was applied: its losses join the window."""
        self.loss += self._step_loss
        self.micro += self._step_micro
        self.samples += self._step_samples
        self._new_step()

    def drop_step(self) -> bool:
        """The step's update was skipped: forget its losses. Returns whether a loss was not finite
        on any rank (a collective: call on every rank)."""
        nonfinite = dist.any_true(bool(self._nonfinite > 0), self.device)
        self._new_step()
        return nonfinite

    def log(self, logger: MetricLogger, step: int, engine: Engine, skipped_total: int) -> None:
        """Log the window's metrics at `step` (on every rank: the loss is averaged over ranks)."""
        loss = dist.mean_over_ranks((self.loss / max(1, self.micro)).reshape(1))
        samples_per_s = self.samples / max(self.step_s, 1e-9)
        metrics = {
            "train/loss": loss.item(),
            "train/lr": engine.lr(),
            "perf/samples_per_s": samples_per_s,
            "perf/data_wait_s": self.data_s,
            "perf/step_s": self.step_s / max(1, self.log_every_steps),
            "train/skipped_total": skipped_total,
        }
        grad_norm = engine.grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        loss_scale = engine.loss_scale()
        if loss_scale is not None:
            metrics["train/loss_scale"] = loss_scale
        if self.flops_per_sample:
            # Forward + backward ~ 3x forward FLOPs; per rank.
            metrics["perf/tflops_per_rank"] = 3 * self.flops_per_sample * samples_per_s / dist.world_size() / 1e12
        if torch.cuda.is_available():
            metrics["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        logger.log(metrics, step)
        dist.print0(f"[train] step {step} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
                    f"{samples_per_s:.1f} samples/s")
        self._new_window()
