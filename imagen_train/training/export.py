"""Export a checkpoint to one safetensors file of the EMA weights (and optionally the raw ones).

Works from a checkpoint of any ZeRO stage on one process: every rank saved the EMA of its own
slice of each flattened parameter, in rank order, so the full tensor is the concatenation of
the slices cut to the parameter's element count. Inference loads the file without DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import save_file

from imagen_train.config import Config, from_dict
from imagen_train.training.checkpoint import CheckpointError, verify

CONFIG_KEY = "imagen_train_config"


def _rank_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("trainer_state_rank*.pt"))
    if not files:
        raise CheckpointError(f"{folder} holds no trainer_state_rank*.pt files")
    return files


def ema_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Stitch the full EMA weights from every rank's slice."""
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in _rank_files(folder)]
    world = states[0]["world_size"]
    if len(states) != world:
        raise CheckpointError(f"{folder} has {len(states)} rank files, the run had {world} ranks")
    layout = states[0]["layout"]
    out = {}
    for name, entry in layout.items():
        flat = torch.cat([s["ema"]["shadow"][name].reshape(-1) for s in states])
        out[name] = flat[: entry["numel"]].reshape(entry["shape"]).clone()
    return out


def read_config(folder: Path) -> Config:
    path = folder / "config.yaml"
    return from_dict(yaml.safe_load(path.read_text()), Config, str(path))


def export_checkpoint(folder: str | Path, out_path: str | Path, include_raw: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_path` (.safetensors) with the EMA weights and the resolved config.

    `include_raw` adds the raw (non-EMA) weights under the prefix `raw.`.
    """
    from imagen_train.training.engine import consolidated_weights

    folder, out_path = Path(folder), Path(out_path)
    verify(folder)
    cfg = read_config(folder)
    tensors = {f"ema.{k}": v.to(dtype).contiguous() for k, v in ema_state_dict(folder).items()}
    if include_raw:
        raw = consolidated_weights(str(folder.parent), folder.name)
        tensors.update({f"raw.{k}": v.to(dtype).contiguous() for k, v in raw.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(cfg.to_dict())})
    tmp.replace(out_path)
    out_path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_path


def exported_config(path: str | Path) -> Config:
    """The training config stored in an exported file's metadata (no tensors are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} is not an imagen-train export (no '{CONFIG_KEY}' metadata)")
    return from_dict(json.loads(meta[CONFIG_KEY]), Config, str(path))


def load_exported(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
                  dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Config]:
    """The network of an exported file with its `ema` (or `raw`) weights, on `device` in `dtype`.

    Built on the meta device (no initialisation that the file would overwrite) and given the
    file's tensors, each read straight to `device` and cast there, so one copy of the weights
    is made. A file that lacks some of the network's weights is refused, naming them.
    """
    from safetensors import safe_open

    from imagen_train.models import assign_weights, build_model

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


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a checkpoints root (its `latest`)."""
    path = Path(path)
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    return path


def export_main(argv: Optional[list[str]] = None) -> None:
    import argparse

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
