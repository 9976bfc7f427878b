"""Exported weights: write them from a checkpoint, and start a new run from them.

Export works from a checkpoint of any ZeRO stage on one process: the EMA is stitched from the
ranks' slices (`artifacts.ema`), and the file is written in the format `artifacts.exports`
reads back (inference loads it without DeepSpeed). `training.init_from` starts a new run from
an export (any world size or ZeRO stage).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from imagen_train.artifacts import (ema_state_dict, exported_config, find_checkpoint, raw_weights, read_config,
                                    verify, write_export)
from imagen_train.config import Config, ConfigError


def export_checkpoint(folder: str | Path, out_path: str | Path, include_raw: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_path` (.safetensors) with the EMA weights and the resolved config.

    `include_raw` adds the raw (non-EMA) weights under the prefix `raw.`.
    """
    folder = Path(folder)
    verify(folder)
    tensors = {f"ema.{k}": v.to(dtype).contiguous() for k, v in ema_state_dict(folder).items()}
    if include_raw:
        tensors.update({f"raw.{k}": v.to(dtype).contiguous() for k, v in raw_weights(folder).items()})
    return write_export(tensors, read_config(folder), out_path)


# ----------------------------------------------------------------------------------------------
# training.init_from: a new run starting from exported weights.

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
    """Copy `training.init_from`'s weights into `net` (before DeepSpeed wraps it), checking that
    the names and shapes match exactly; errors name the key and the file."""
    path, prefix = cfg.training.init_from, cfg.training.init_from_weights + "."
    with safe_open(path, framework="pt") as f:
        names = {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}
        params = dict(net.named_parameters())
        missing, unexpected = sorted(set(params) - names), sorted(names - set(params))
        if missing or unexpected:
            raise ConfigError("training.init_from", "an export of this network (same parameter names)",
                              f"{path} (missing: {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                              f"unexpected: {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})")
        for name, p in params.items():
            shape = list(f.get_slice(prefix + name).get_shape())
            if shape != list(p.shape):
                raise ConfigError("training.init_from", "an export of this network (same shapes)",
                                  f"{path} ('{name}' is {shape} there, {list(p.shape)} here)")
        for name, p in params.items():
            p.copy_(f.get_tensor(prefix + name))


def export_main(argv: Optional[list[str]] = None) -> None:
    """The command line of launch/export.py."""
    parser = argparse.ArgumentParser(description="Export a training checkpoint to safetensors "
                                     "(EMA weights + resolved config), loadable without DeepSpeed.")
    parser.add_argument("checkpoint", help="a checkpoint folder (step_NNNNNNNN) or a checkpoints root")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--raw", action="store_true", help="also store the raw (non-EMA) weights")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = export_checkpoint(find_checkpoint(args.checkpoint), args.out, args.raw, dtype)
    print(json.dumps({"export": str(out), "config": str(out.with_suffix(".yaml"))}))
