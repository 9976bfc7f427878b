"""Exported weights (.safetensors with the resolved config in its metadata): writing one from a
checkpoint folder (`export_checkpoint`), and loading a stage's network for inference from an
export or a checkpoint folder, without DeepSpeed.

An export holds the EMA weights under `ema.` (and optionally the raw weights under `raw.`) and
the training config as JSON under the metadata key CONFIG_KEY; a `.yaml` of the same config
sits beside it for people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from imagen_train.config import Config, from_dict, upgrade_stored
from imagen_train.models import assign_weights, build_model

from .checkpoints import find_checkpoint, read_config, verify
from .ema import ema_state_dict

CONFIG_KEY = "imagen_train_config"


def write_export(tensors: dict[str, torch.Tensor], cfg: Config, out_path: str | Path) -> Path:
    """Write `tensors` (keys `ema.<name>` / `raw.<name>`) and `cfg` to `out_path`, through a
    rename, and the config as `<out_path stem>.yaml` beside it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    tmp.replace(out_path)
    out_path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_path


def export_checkpoint(folder: str | Path, out_path: str | Path, include_raw: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_path` (.safetensors) with the EMA weights of a verified checkpoint folder (of
    any ZeRO stage, stitched on this one process) and its resolved config.

    `include_raw` adds the raw (non-EMA) weights under the prefix `raw.` (DeepSpeed reads them).
    """
    folder = Path(folder)
    verify(folder)
    tensors = {f"ema.{k}": v.to(dtype).contiguous() for k, v in ema_state_dict(folder).items()}
    if include_raw:
        tensors.update({f"raw.{k}": v.to(dtype).contiguous() for k, v in raw_weights(folder).items()})
    return write_export(tensors, read_config(folder), out_path)


def exported_config(path: str | Path) -> Config:
    """The training config stored in an exported file's metadata (no tensors are read)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} is not an imagen-train export (no '{CONFIG_KEY}' metadata)")
    return from_dict(upgrade_stored(json.loads(meta[CONFIG_KEY])), Config, str(path))


def load_exported(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                  dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Config]:
    """The network of an exported file with its `ema` (or `raw`) weights, on `device` in `dtype`.

    Built on the meta device (no initialisation that the file would overwrite) and given the
    file's tensors, each read straight to `device` and cast there, so one copy of the weights
    is made. A file that lacks some of the network's weights is refused, naming them.
    """
    path = Path(path)
    cfg = exported_config(path)
    prefix = weights + "."
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # safetensors reads a bare "cuda" as cuda:0
        device = torch.device("cuda", torch.cuda.current_device())
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            if key.startswith(prefix):
                tensor = f.get_tensor(key)
                state[key[len(prefix):]] = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
    if not state:
        raise ValueError(f"{path} holds no '{weights}' weights (export with include_raw for raw)")
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device="meta")
    assign_weights(net, state, f"{path} ('{prefix}' tensors)")
    return net.eval(), cfg


def raw_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) fp32 weights of a checkpoint folder of any ZeRO stage, on one process."""
    # Optional dependency: only DeepSpeed reads its own (pickled) optimizer files. Exports and
    # EMA weights never need it, so inference from them does not import DeepSpeed.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def stage_config(path: str | Path) -> Config:
    """The training config of an export file, a checkpoint folder or a checkpoints root (its
    `latest`), read without loading any weights."""
    p = Path(path)
    if p.is_dir():
        return read_config(find_checkpoint(p))
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (an exported .safetensors file or a "
                                "training checkpoint folder)")
    return exported_config(p)


def load_network(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                 dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Config]:
    """A stage's network with its `ema` (or `raw`) weights from an export file, a checkpoint
    folder or a checkpoints root, on `device` in `dtype`, in eval mode.

    The network is built on the meta device and takes the loaded tensors as its weights: the
    random initialisation a normal build does (~20 s for base64-2b on two CPU cores) would be
    overwritten anyway.
    """
    p = Path(path)
    if not p.is_dir():
        return load_exported(p, weights=weights, device=device, dtype=dtype)
    folder = find_checkpoint(p)
    cfg = read_config(folder)
    state = ema_state_dict(folder) if weights == "ema" else raw_weights(folder)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device="meta")
    assign_weights(net, state, f"{folder} ({'EMA' if weights == 'ema' else 'raw'} weights)", device, dtype)
    return net.eval(), cfg
