"""Test-only: hold a training rank at a named phase, so that a test can send its stop signal there.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one; the
tests put this folder on PYTHONPATH. Nothing happens unless IMAGEN_TRAIN_TEST_PAUSE is set,
and only in processes running launch/train.py (not the launchers, not the test itself). The
production code is untouched: the hooks wrap functions from outside, as their modules load.

IMAGEN_TRAIN_TEST_PAUSE    comma-separated PHASE or PHASE@RANK (no @RANK: every rank):
    import     while `torch` is first imported (launch/train.py has caught the stop signals)
    build      in DeepSpeed's build/load of its CPU communication op, before the rendezvous
    eval       inside the first sampling batch of a periodic evaluation
    save       inside a checkpoint save (after DeepSpeed's files, before our rank state)
    nan        at an update skipped for a non-finite loss
    step       after the first logged step of the process, while MARKERS/hold exists
IMAGEN_TRAIN_TEST_MARKERS  a folder, where rank R writes:
    PHASE-rankR        when it pauses at PHASE
    rendezvous-rankR   as it enters torch.distributed.init_process_group (never paused)
    stop-rankR         when its stop request is set (first time)
    calls-eval-rankR   one line per sampling batch
A pause lasts until the rank's own `stop-rankR` marker exists, or PAUSE_LIMIT_S.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

PAUSE_LIMIT_S = 120.0


def _phases() -> dict[str, set]:
    out: dict[str, set] = {}
    for item in os.environ.get("IMAGEN_TRAIN_TEST_PAUSE", "").split(","):
        phase, _, rank = item.strip().partition("@")
        if phase:
            out.setdefault(phase, set()).add(int(rank) if rank else None)
    return out


PHASES = _phases()
MARKERS = Path(os.environ.get("IMAGEN_TRAIN_TEST_MARKERS", "."))
RANK = int(os.environ.get("RANK", "0"))
IS_RANK = bool(sys.argv) and sys.argv[0].endswith(os.path.join("launch", "train.py"))


def _mark(name: str, line: str = "") -> None:
    with open(MARKERS / f"{name}-rank{RANK}", "a") as f:
        f.write(line + "\n")


def _pause(phase: str) -> None:
    ranks = PHASES.get(phase)
    if not ranks or not (None in ranks or RANK in ranks):
        return
    _mark(phase)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    # Until this rank's own request: a peer's may come while this rank's vote is still "go on".
    while not (MARKERS / f"stop-rank{RANK}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class _Hooks(importlib.abc.MetaPathFinder):
    """Pauses at the first import of `torch`; patches modules named in `patches` once loaded."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name == "torch":
            _pause("import")
            return None
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module
        patch = self.patches.pop(name)

        def exec_module(module):
            run(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec


def _wrap(owner, attr: str, before=None, after=None) -> None:
    inner = getattr(owner, attr)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if before:
            before()
        out = inner(*args, **kwargs)
        if after:
            after()
        return out
    setattr(owner, attr, wrapper)


def _patch_comm(module) -> None:
    import torch.distributed as tdist
    _wrap(module, "build_shm_op", before=lambda: _pause("build"))
    _wrap(tdist, "init_process_group", before=lambda: _mark("rendezvous"))


def _patch_preemption(module) -> None:
    inner = module.StopRequest.request

    def request(self, reason):
        if not self.requested:
            _mark("stop", reason)
        inner(self, reason)
    module.StopRequest.request = request


def _logged_step() -> None:
    if (MARKERS / "hold").exists() and not _HELD:
        _HELD.append(True)
        _pause("step")


_HELD: list = []


def _patch_trainer(module) -> None:
    _wrap(module.Trainer, "_bad_step", after=lambda: _pause("nan"))
    _wrap(module.Trainer, "_log", after=_logged_step)


def _eval_batch() -> None:
    _mark("calls-eval")
    _pause("eval")


if IS_RANK and PHASES:
    sys.meta_path.insert(0, _Hooks({
        "deepspeed.comm.torch": _patch_comm,
        "imagen_train.training.preemption": _patch_preemption,
        "imagen_train.diffusion.diffusion": lambda m: _wrap(m.Diffusion, "sample", before=_eval_batch),
        "imagen_train.training.checkpoint": lambda m: _wrap(m, "save_rank_state", before=lambda: _pause("save")),
        "imagen_train.training.trainer": _patch_trainer,
    }))
