"""Denoising networks: the base UNet (64 px) and the Efficient U-Net (SR stages).

Single-device and free of I/O: nothing here imports DeepSpeed, torch.distributed or YAML.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Mapping, Optional

import torch
from torch import nn

from imagen_train.models.efficient_unet import EfficientUNet
from imagen_train.models.unet import UNet
from imagen_train.schema import ModelConfig, TextConfig
from imagen_train.stages import get_stage


__all__ = ["NETWORKS", "EfficientUNet", "UNet", "WeightsMismatchError", "assign_weights", "build_model",
           "count_parameters"]

NETWORKS: dict[str, type[nn.Module]] = {"unet": UNet, "efficient_unet": EfficientUNet}  # by model.kind
_LISTED_KEYS = 8  # names shown in a mismatch error before "... and N more"


def build_model(model_cfg: ModelConfig, text_cfg: TextConfig, stage: str,
                train_resolution: Optional[int] = None,
                device: Optional[torch.device | str] = None) -> nn.Module:
    """The stage's network, built from its config; `train_resolution` places the attention levels.

    `device` builds the weights there, initialised as usual; `device="meta"` allocates and
    initialises nothing, for weights that `assign_weights` then brings from a file (the time this
    saves: docs/design-notes.md).
    """
    spec = get_stage(stage)
    resolution = train_resolution or spec.train_resolution
    if model_cfg.kind != spec.kind:
        raise ValueError(f"stage {stage} needs model.kind {spec.kind!r}, got {model_cfg.kind!r}")
    network = NETWORKS[spec.kind]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return network(model_cfg, text_cfg.embed_dim, resolution)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


class WeightsMismatchError(ValueError):
    """A state dict whose names do not match the network's; the message names the source and keys."""


def _names(keys: set[str]) -> str:
    shown = sorted(keys)[:_LISTED_KEYS]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" ... and {more} more" if more else "")


def assign_weights(net: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                   device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Make `state`'s tensors the weights of `net` (built on any device, the meta one included).

    The one weight assigner: exports, checkpoint folders and `training.init_from` all load
    through it. `state` must name exactly the network's state-dict entries, each of the
    network's shape; otherwise WeightsMismatchError names `source` (e.g. the file) and the keys.
    Tensors are moved to `device` and floating ones cast to `dtype` where given (no copy when
    they are there already: read a file straight to its device and dtype to keep one copy of
    the weights), then taken as they are by `load_state_dict(assign=True)`. Afterwards every
    parameter and buffer is checked off the meta device: one outside the state dict (a
    non-persistent buffer, say) would be left unset by a meta build.
    """
    shapes = {key: tuple(t.shape) for key, t in net.state_dict().items()}
    missing, unexpected = set(shapes) - set(state), set(state) - set(shapes)
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_names(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_names(unexpected)}"] if unexpected else []
        raise WeightsMismatchError(f"{source} does not hold this {type(net).__name__}'s weights ("
                                   + "; ".join(parts) + ")")
    wrong = [key for key in shapes if tuple(state[key].shape) != shapes[key]]
    if wrong:
        listed = "; ".join(f"'{k}' is {list(state[k].shape)} there, {list(shapes[k])} here"
                           for k in wrong[:_LISTED_KEYS])
        more = f" ... and {len(wrong) - _LISTED_KEYS} more" if len(wrong) > _LISTED_KEYS else ""
        raise WeightsMismatchError(f"{source} holds weights of other shapes than this {type(net).__name__}'s "
                                   f"({len(wrong)}: {listed}{more})")
    moved = {}
    for key in list(state):
        tensor = state[key]
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        moved[key] = tensor.to(device=device, dtype=cast) if device is not None or cast else tensor
    net.load_state_dict(moved, strict=True, assign=True)
    unset = [name for name, t in itertools.chain(net.named_parameters(), net.named_buffers()) if t.is_meta]
    if unset:
        raise RuntimeError(f"{type(net).__name__} built on the meta device: {_names(set(unset))} "
                           f"not in {source} and still unset")
    return net
