"""Test-only: hold a training rank at a named phase, so that a test can send its stop signal there.

Installed by tests/hooks/sitecustomize.py in training ranks when IMAGEN_TRAIN_TEST_PAUSE is set.

IMAGEN_TRAIN_TEST_PAUSE    comma-separated PHASE or PHASE@RANK (no @RANK: every rank):
    import     while `torch` is first imported (launch/train.py has caught the stop signals)
    build      in DeepSpeed's build/load of its CPU communication op, before the rendezvous
    eval       inside the first sampling batch of a periodic evaluation
    save       inside a checkpoint save (after the engine's files, before our rank state)
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

import os
import time
from pathlib import Path

from sitecustomize import RANK, wrap

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


def _mark(name: str, line: str = "") -> None:
    with open(MARKERS / f"{name}-rank{RANK}", "a") as f:
        f.write(line + "\n")


def pause(phase: str) -> None:
    """Hold here (this rank, if PHASES names it) until this rank's stop request is marked."""
    ranks = PHASES.get(phase)
    if not ranks or not (None in ranks or RANK in ranks):
        return
    _mark(phase)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    # Until this rank's own request: a peer's may come while this rank's vote is still "go on".
    while not (MARKERS / f"stop-rank{RANK}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _patch_comm(module) -> None:
    import torch.distributed as tdist  # loaded by now: DeepSpeed's comm module imports it
    wrap(module, "build_shm_op", before=lambda: pause("build"))
    wrap(tdist, "init_process_group", before=lambda: _mark("rendezvous"))


def _patch_preemption(module) -> None:
    inner = module.StopRequest.request

    def request(self, reason):
        if not self.requested:
            _mark("stop", reason)
        inner(self, reason)
    module.StopRequest.request = request


_HELD: list = []


def _logged_step() -> None:
    if (MARKERS / "hold").exists() and not _HELD:
        _HELD.append(True)
        pause("step")


def _eval_batch() -> None:
    _mark("calls-eval")
    pause("eval")


# Module name -> what to wrap in it once it has run.
PATCHES = {
    "deepspeed.comm.torch": _patch_comm,
    "imagen_train.training.preemption": _patch_preemption,
    "imagen_train.diffusion.diffusion": lambda m: wrap(m.Diffusion, "sample", before=_eval_batch),
    "imagen_train.training.checkpoint": lambda m: wrap(m, "save_rank_state", before=lambda: pause("save")),
    "imagen_train.training.bad_steps": lambda m: wrap(m.BadSteps, "skipped", after=lambda: pause("nan")),
    "imagen_train.training.step_metrics": lambda m: wrap(m.StepMetrics, "log", after=_logged_step),
}
