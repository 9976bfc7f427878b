"""training.init_from: a new run starting from exported weights (any world size or ZeRO stage).

Exports are written by `artifacts.export_checkpoint` (launch/export.py) and read here through
`models.assign_weights`, the one weight assigner, so a file of another network is refused with
the same message as at inference, under the config key that named it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from imagen_train.artifacts import exported_config
from imagen_train.config import Config, ConfigError
from imagen_train.models import WeightsMismatchError, assign_weights


def check_init_from(cfg: Config) -> None:
    """Refuse `training.init_from` naming a missing file, a non-export, another stage's export,
    or one without the chosen weights; cheap (reads the header only)."""
    path, which = cfg.training.init_from, cfg.training.init_from_weights
    if not Path(path).is_file():
        raise ConfigError("training.init_from", "an existing .safetensors export "
                          "(launch/export.py writes one)", f"{path} (no such file)")
    try:
        saved = exported_config(path)
        with safe_open(path, framework="pt") as f:
            has = any(k.startswith(which + ".") for k in f.keys())
    except Exception as err:  # safetensors raises its own error types for a non-safetensors file
        raise ConfigError("training.init_from", "an imagen-train .safetensors export",
                          f"{path} ({type(err).__name__}: {err})") from None
    if saved.stage != cfg.stage:
        raise ConfigError("training.init_from", f"an export of stage {cfg.stage}",
                          f"{path} (its metadata says stage {saved.stage})")
    if not has:
        raise ConfigError("training.init_from_weights", f"weights that {path} holds (it has no "
                          f"'{which}.' tensors{'; export with --raw' if which == 'raw' else ''})", which)


@contextmanager
def init_tensors(cfg: Config) -> Iterator[Callable[[str], torch.Tensor]]:
    """`read(name)`: one full fp32 tensor of `training.init_from`, read on demand (memory-mapped)."""
    prefix = cfg.training.init_from_weights + "."
    with safe_open(cfg.training.init_from, framework="pt") as f:
        yield lambda name: f.get_tensor(prefix + name).float()


@torch.no_grad()
def load_init_weights(net: torch.nn.Module, cfg: Config) -> None:
    """Make `training.init_from`'s weights those of `net` (before DeepSpeed wraps it), in `net`'s
    dtype; a file of another network is a ConfigError naming the key, the file and the tensors
    (`net` is left without weights then: the run stops)."""
    path, prefix = cfg.training.init_from, cfg.training.init_from_weights + "."
    dtype = next(net.parameters()).dtype
    # The file's tensors replace the built ones: drop those first, so that the host holds one
    # copy of the weights at a time, not two (a 2B network is 8 GiB in fp32 on every rank).
    net.to("meta")
    with safe_open(path, framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    try:
        assign_weights(net, state, f"{path} ('{prefix}' tensors)", dtype=dtype)
    except WeightsMismatchError as err:
        raise ConfigError("training.init_from", "an export of this network", str(err)) from None
