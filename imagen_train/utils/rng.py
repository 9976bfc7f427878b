"""The process's global RNG states (torch CPU, CUDA on this device, numpy, python): captured as
plain tensors and numbers (what `torch.load(weights_only=True)` reads back), restored exactly."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, for a checkpoint or for `set_rng_state`."""
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    _, py_keys, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached_gauss)],
            "python": list(py_keys), "python_gauss": py_gauss,
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (checkpoints written before the cached Gaussians were
    saved restore without them)."""
    torch.set_rng_state(state["torch"])
    has_gauss, cached_gauss = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         int(has_gauss), float(cached_gauss)))
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore every global RNG's state on exit, whatever the body drew."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
