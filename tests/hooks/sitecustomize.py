"""Test-only hooks in training ranks, installed from outside as their modules load.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one; the
tests put this folder on PYTHONPATH (tests/train_helpers.py `train_env` does so whenever a hook
variable is set). Nothing happens unless one is, and only in processes running launch/train.py
(not the launchers, not the test itself). The production code has no hook for any of it: each
function is wrapped from outside, right after its module has run.

- hook_phases.py (IMAGEN_TRAIN_TEST_PAUSE): hold a rank at a named phase (importing torch,
  building DeepSpeed's comm op, an evaluation batch, a save, a skipped update, after a step),
  so that a test can send its stop signal there.
- hook_faults.py (IMAGEN_TRAIN_FAULT_*): wrap the training engine the trainer builds, to inject
  NaN losses and gradients, SIGKILL after a step or in a save, a full disk in a save, and an
  abort at interpreter teardown.

Nothing here imports torch: the `import` phase pauses inside torch's first import.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Callable

RANK = int(os.environ.get("RANK", "0"))
IS_RANK = bool(sys.argv) and sys.argv[0].endswith(os.path.join("launch", "train.py"))
PAUSES = bool(os.environ.get("IMAGEN_TRAIN_TEST_PAUSE"))
FAULTS = any(key.startswith("IMAGEN_TRAIN_FAULT_") and value for key, value in os.environ.items())


def wrap(owner, attr: str, before: Callable[[], None] = None, after: Callable[[], None] = None) -> None:
    """Replace `owner.attr` by a function that calls `before()`, the original, then `after()`."""
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


class _Hooks(importlib.abc.MetaPathFinder):
    """Runs `on_torch()` at the first import of `torch`; patches the modules named in `patches`
    (name -> list of functions of the module) once each has run."""

    def __init__(self, patches: dict[str, list[Callable]], on_torch: Callable[[], None]):
        self.patches, self.on_torch = patches, on_torch

    def find_spec(self, name, path, target=None):
        if name == "torch":
            self.on_torch()
            return None
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module
        patches = self.patches.pop(name)

        def exec_module(module):
            run(module)
            for patch in patches:
                patch(module)
        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    patches: dict[str, list[Callable]] = {}
    on_torch = lambda: None  # noqa: E731
    if PAUSES:
        import hook_phases
        for name, patch in hook_phases.PATCHES.items():
            patches.setdefault(name, []).append(patch)
        on_torch = lambda: hook_phases.pause("import")  # noqa: E731
    if FAULTS:
        # Imported once the engine's module loads (hook_faults imports torch).
        patches.setdefault("imagen_train.training.engine", []).append(
            lambda module: __import__("hook_faults").install(module))
    sys.meta_path.insert(0, _Hooks(patches, on_torch))


if IS_RANK and (PAUSES or FAULTS):
    _install()
