"""Fault injection for the fault-tolerance tests, read from environment variables.

Nothing here runs unless a variable is set. Each variable holds comma-separated `STEP` or
`STEP@RANK` entries (no `@RANK`: every rank); STEP is the optimizer step being computed
(1-based, the step that becomes `trainer.step` once it succeeds).

    IMAGEN_TRAIN_FAULT_NAN_STEPS       the loss of that step's first micro batch becomes NaN
    IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS  that micro batch's gradient becomes NaN (the loss stays finite)
    IMAGEN_TRAIN_FAULT_KILL_STEPS      SIGKILL the rank right after that step's optimizer update
    IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS SIGKILL the rank in the middle of writing that step's checkpoint
    IMAGEN_TRAIN_FAULT_SAVE_ERROR_STEPS raise ENOSPC while writing that step's checkpoint
    IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS  comma-separated ranks that abort (SIGABRT) if the
        interpreter tears down their modules at exit, as gloo's threads can after a finished run

Each entry fires once per process.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import torch

NAN_LOSS = "IMAGEN_TRAIN_FAULT_NAN_STEPS"
NAN_GRAD = "IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS"
KILL = "IMAGEN_TRAIN_FAULT_KILL_STEPS"
KILL_IN_SAVE = "IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS"
SAVE_ERROR = "IMAGEN_TRAIN_FAULT_SAVE_ERROR_STEPS"
TEARDOWN_ABORT = "IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS"


def _parse(raw: str) -> set[tuple[int, int | None]]:
    entries = set()
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        step, _, rank = item.partition("@")
        entries.add((int(step), int(rank) if rank else None))
    return entries


class Faults:
    """The injected faults of this process; `fire(kind, step, rank)` is true once per entry."""

    def __init__(self, environ=os.environ):
        self._pending = {kind: _parse(environ.get(kind, ""))
                         for kind in (NAN_LOSS, NAN_GRAD, KILL, KILL_IN_SAVE, SAVE_ERROR)}
        self._teardown_abort_ranks = {int(r) for r in environ.get(TEARDOWN_ABORT, "").split(",") if r.strip()}

    def fire(self, kind: str, step: int, rank: int) -> bool:
        for key in ((step, rank), (step, None)):
            if key in self._pending[kind]:
                self._pending[kind].discard(key)
                return True
        return False

    def kill_if(self, kind: str, step: int, rank: int) -> None:
        """SIGKILL this process (no cleanup, no exit handlers: a node dying) if an entry fires."""
        if self.fire(kind, step, rank):
            print(f"[fault] SIGKILL rank {rank} at step {step} ({kind})", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def raise_if_save_error(self, step: int, rank: int, path: str) -> None:
        if self.fire(SAVE_ERROR, step, rank):
            raise OSError(errno.ENOSPC, f"No space left on device (injected) writing {path}")

    def arm_teardown_abort(self, rank: int) -> None:
        """Make this rank abort at interpreter teardown if TEARDOWN_ABORT names it."""
        global _teardown_trap
        if rank in self._teardown_abort_ranks:
            _teardown_trap = _AbortOnTeardown()


class _AbortOnTeardown:
    """Aborts the process when it is freed: held in a module global, that is at the
    interpreter's teardown of its modules, which runs after the atexit handlers."""

    def __del__(self):
        os.abort()


_teardown_trap: _AbortOnTeardown | None = None


class _NanGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it becomes NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradient(loss: torch.Tensor) -> torch.Tensor:
    """`loss` with the same value, whose backward pass fills every gradient with NaN."""
    return _NanGradient.apply(loss)
