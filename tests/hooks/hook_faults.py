"""Test-only fault injection: the engine the trainer builds, wrapped from outside.

Installed by tests/hooks/sitecustomize.py in training ranks when an IMAGEN_TRAIN_FAULT_*
variable is set: `imagen_train.training.engine.create_engine` then returns a `FaultyEngine`
around the real engine (training/engine_api.py's `Engine`), which the trainer uses unaware. Each
variable holds comma-separated `STEP` or `STEP@RANK` entries (no `@RANK`: every rank); STEP is
the optimizer step being computed (1-based: the step the run reaches once its update is
applied). Each entry fires once per process.

    IMAGEN_TRAIN_FAULT_NAN_STEPS        the network's output in that step's first forward pass
                                        becomes NaN, so its loss (and every gradient) does
    IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS   that step's first backward pass gives NaN gradients; the
                                        loss stays finite
    IMAGEN_TRAIN_FAULT_KILL_STEPS       SIGKILL the rank right after that step's update
    IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS  SIGKILL the rank in the middle of writing that step's
                                        checkpoint (the engine's files written, ours not)
    IMAGEN_TRAIN_FAULT_SAVE_ERROR_STEPS raise ENOSPC at the same point of that step's checkpoint
    IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS  comma-separated ranks that abort (SIGABRT) if the
        interpreter tears down their modules at exit, as gloo's threads can after a finished run
        (armed when the engine is built)

The engine counts the steps itself: the updates it applied, from the step of the checkpoint it
loaded (its folder's name), so no trainer state is read.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from pathlib import Path

import torch

from sitecustomize import RANK

NAN_LOSS = "IMAGEN_TRAIN_FAULT_NAN_STEPS"
NAN_GRAD = "IMAGEN_TRAIN_FAULT_NAN_GRAD_STEPS"
KILL = "IMAGEN_TRAIN_FAULT_KILL_STEPS"
KILL_IN_SAVE = "IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS"
SAVE_ERROR = "IMAGEN_TRAIN_FAULT_SAVE_ERROR_STEPS"
TEARDOWN_ABORT = "IMAGEN_TRAIN_FAULT_TEARDOWN_ABORT_RANKS"
_STEP_IN_NAME = re.compile(r"step_(\d+)$")  # step_NNNNNNNN, or its staging name .staging-step_NNNNNNNN


def _parse(raw: str) -> set[tuple[int, int | None]]:
    entries = set()
    for item in raw.split(","):
        step, _, rank = item.strip().partition("@")
        if step:
            entries.add((int(step), int(rank) if rank else None))
    return entries


class Faults:
    """The injected faults of this process; `fire(kind, step)` is true once per matching entry."""

    def __init__(self, environ=os.environ, rank: int = RANK):
        self.rank = rank
        self.pending = {kind: _parse(environ.get(kind, "")) for kind in (NAN_LOSS, NAN_GRAD, KILL, KILL_IN_SAVE,
                                                                          SAVE_ERROR)}

    def fire(self, kind: str, step: int) -> bool:
        for key in ((step, self.rank), (step, None)):
            if key in self.pending[kind]:
                self.pending[kind].discard(key)
                return True
        return False

    def kill_if(self, kind: str, step: int) -> None:
        """SIGKILL this process (no cleanup, no exit handlers: a node dying) if an entry fires."""
        if self.fire(kind, step):
            print(f"[fault] SIGKILL rank {self.rank} at step {step} ({kind})", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class _NanGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it becomes NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _step_of(folder: Path) -> int:
    return int(_STEP_IN_NAME.search(Path(folder).name).group(1))


class FaultyEngine:
    """An Engine that passes everything to `inner`, injecting the faults of `faults` on the way."""

    def __init__(self, inner, faults: Faults):
        self.inner, self.faults = inner, faults
        self.applied = 0  # the step of the last applied update

    def __getattr__(self, name):  # device, dtype, accum_steps, master_weights, ... as the engine's
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if self.faults.fire(NAN_LOSS, self.applied + 1):
            out = out * float("nan")
        return out

    def backward(self, loss):
        if self.faults.fire(NAN_GRAD, self.applied + 1):
            loss = _NanGradient.apply(loss)  # the same value; NaN gradients
        self.inner.backward(loss)

    def step(self):
        applied = self.inner.step()
        if applied:
            self.applied += 1
            self.faults.kill_if(KILL, self.applied)
        return applied

    def save(self, folder):
        self.inner.save(folder)
        step = _step_of(folder)
        self.faults.kill_if(KILL_IN_SAVE, step)
        if self.faults.fire(SAVE_ERROR, step):
            raise OSError(errno.ENOSPC, f"No space left on device (injected) writing {folder}")

    def load(self, folder):
        self.inner.load(folder)
        self.applied = _step_of(folder)

    def load_resharded(self, folder, layouts):
        read = self.inner.load_resharded(folder, layouts)
        self.applied = _step_of(folder)
        return read


class _AbortOnTeardown:
    """Aborts the process when it is freed: held in a module global, that is at the
    interpreter's teardown of its modules, which runs after the atexit handlers."""

    abort = staticmethod(os.abort)  # kept here: `os` may be torn down first

    def __del__(self):
        self.abort()


_teardown_trap: list[_AbortOnTeardown] = []


def arm_teardown_abort(environ=os.environ, rank: int = RANK) -> None:
    """Make this process abort at interpreter teardown if TEARDOWN_ABORT names its rank."""
    if str(rank) in [r.strip() for r in environ.get(TEARDOWN_ABORT, "").split(",")]:
        _teardown_trap.append(_AbortOnTeardown())
        print(f"[fault] rank {rank}: abort at interpreter teardown armed", file=sys.stderr, flush=True)


def install(engine_module) -> None:
    """Make `engine_module.create_engine` return a FaultyEngine, and arm the teardown trap."""
    create = engine_module.create_engine
    faults = Faults()

    def create_engine(*args, **kwargs):
        arm_teardown_abort()
        return FaultyEngine(create(*args, **kwargs), faults)
    engine_module.create_engine = create_engine
