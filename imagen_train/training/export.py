"""Exported weights: write them from a checkpoint, read them back, start a run from them.

Export works from a checkpoint of any ZeRO stage on one process: every rank saved the EMA of
its own slice of each flattened parameter together with the slice's bounds (`layout`), so the
full tensor is the slices placed at their bounds. Inference loads the file without DeepSpeed;
`training.init_from` starts a new run from it (any world size or ZeRO stage).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from imagen_train.config import Config, ConfigError, from_dict, upgrade_stored
from imagen_train.training.checkpoint import CheckpointError, verify

CONFIG_KEY = "imagen_train_config"


def _rank_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("trainer_state_rank*.pt"))
    if not files:
        raise CheckpointError(f"{folder} holds no trainer_state_rank*.pt files")
    return files


def slice_bounds(entry: dict, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that `rank` kept an EMA of.

    Checkpoints record the bounds per rank. Older ones (no 'start' key) cut every parameter in
    equal parts of ceil(numel / world), the last rank's part padded under ZeRO-3.
    """
    if "start" in entry:
        return int(entry["start"]), int(entry["end"])
    numel = int(entry["numel"])
    part = -(-numel // world)
    return min(rank * part, numel), min((rank + 1) * part, numel)


def stitch(name: str, numel: int, pieces: list[tuple[int, int, torch.Tensor]],
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat parameter `name` (numel,) from its ranks' (start, end, slice) pieces, in `dtype`."""
    full = torch.empty(numel, dtype=dtype, device=pieces[0][2].device if pieces else "cpu")
    covered = 0
    for start, end, piece in sorted((x for x in pieces if x[1] > x[0]), key=lambda item: item[0]):
        if start != covered:
            raise CheckpointError(f"EMA slices of '{name}' do not tile it: a gap or overlap at "
                                  f"element {covered} (next slice starts at {start})")
        full[start:end] = piece.reshape(-1)[: end - start]
        covered = end
    if covered != numel:
        raise CheckpointError(f"EMA slices of '{name}' cover {covered} of its {numel} elements")
    return full


def _rank_states(folder: Path) -> list[dict]:
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in _rank_files(folder)]
    world = states[0]["world_size"]
    if len(states) != world:
        raise CheckpointError(f"{folder} has {len(states)} rank files, the run had {world} ranks")
    return states


def ema_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Stitch the full EMA weights (fp32) from every rank's slice."""
    states = _rank_states(folder)
    world = len(states)
    out = {}
    for name, entry in states[0]["layout"].items():
        pieces = [(*slice_bounds(s["layout"][name], r, world), s["ema"]["shadow"][name])
                  for r, s in enumerate(states)]
        out[name] = stitch(name, int(entry["numel"]), pieces).reshape(entry["shape"])
    return out


def ema_slices_for(folder: Path, layout: dict[str, dict]) -> dict[str, torch.Tensor]:
    """This rank's EMA slices under `layout`, cut from a checkpoint saved with other bounds.

    Resuming a checkpoint written before the EMA followed the fp32 masters (its slices were cut
    in equal parts) re-cuts its EMA to the current bounds; same world size only.
    """
    full = ema_state_dict(folder)
    return {name: full[name].reshape(-1)[e["start"]:e["end"]].clone() for name, e in layout.items()}


def read_config(folder: Path) -> Config:
    path = folder / "config.yaml"
    return from_dict(upgrade_stored(yaml.safe_load(path.read_text())), Config, str(path))


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
