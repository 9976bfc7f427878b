"""Checkpoint folders on disk: names, manifests, `latest`, verification, the saved config.

Layout of `<checkpoint dir>`:
    step_00001000/            a complete checkpoint (DeepSpeed files + our per-rank state)
        manifest.json         every file's size and sha256, written last before the rename
        config.yaml           the run's resolved config
        trainer_state_rankNNNNN.pt   one rank's EMA slices, RNG and data position
    latest                    the tag of the newest complete checkpoint, replaced atomically
    .staging-step_00002000/   a checkpoint being written; never read, removed on the next save

Everything here works on one process and enters no collective: training writes through these
helpers (training/checkpoint.py adds the collectives) and evaluation reads through them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from imagen_train.config import Config, from_dict, upgrade_stored

MANIFEST = "manifest.json"
LATEST = "latest"
CONFIG_FILE = "config.yaml"
STAGING_PREFIX = ".staging-"
RANK_STATE_GLOB = "trainer_state_rank*.pt"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, corrupt or of another run; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full or failing disk); the previous one is intact."""


def tag_for(step: int) -> str:
    """The folder name of the checkpoint of `step`: step_NNNNNNNN."""
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step a checkpoint tag names; CheckpointError for anything else."""
    match = _TAG_RE.match(tag)
    if not match:
        raise CheckpointError(f"'{tag}' is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(match.group(1))


def staging_tag(step: int) -> str:
    """The folder name a checkpoint of `step` is written under before it is complete."""
    return STAGING_PREFIX + tag_for(step)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Per-rank state files.

def rank_state_path(folder: Path, rank: int) -> Path:
    """Where rank `rank`'s own state (EMA slices, RNG, data position) lives in a checkpoint."""
    return folder / f"trainer_state_rank{rank:05d}.pt"


def write_rank_state(folder: Path, rank: int, state: dict) -> None:
    """Save one rank's state into a (staging) checkpoint folder, through a rename."""
    path = rank_state_path(folder, rank)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_rank_state(folder: Path, rank: int) -> dict:
    """One rank's state (tensors and plain data only: nothing else is unpickled)."""
    path = rank_state_path(folder, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written by a run with "
                              f"another number of ranks?")
    return torch.load(path, map_location="cpu", weights_only=True)


def pickled_bytes(path: Path) -> int:
    """Size of the pickled structure of a torch.save file: what a memory-mapped load reads whole
    (its tensors are read only where touched)."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist() if info.filename.endswith(".pkl"))


def read_all_rank_states(folder: Path, mmap: bool = False) -> list[dict]:
    """Every rank's state, in rank order; refuses a folder missing some of them.

    `mmap`: tensors (the EMA slices) are memory-mapped, so only the parts used are read: what
    lets every rank of a re-sliced resume open every old rank's file.
    """
    files = sorted(folder.glob(RANK_STATE_GLOB))
    if not files:
        raise CheckpointError(f"{folder} holds no {RANK_STATE_GLOB} files")
    states = [torch.load(f, map_location="cpu", weights_only=True, mmap=mmap) for f in files]
    world = states[0]["world_size"]
    if len(states) != world:
        raise CheckpointError(f"{folder} has {len(states)} rank files, the run had {world} ranks")
    return states


# ----------------------------------------------------------------------------------------------
# Sealing: manifest, `latest`, pruning (rank 0 calls these once every rank has written).

def write_manifest(folder: Path, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> None:
    """The manifest of a staging folder: `files[name] = {"size", "sha256"}` for every file."""
    atomic_write_text(folder / MANIFEST, json.dumps(
        {"step": step, "world_size": world_size, "files": files}, indent=1))


def manifest_entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def point_latest(root: Path, tag: str) -> None:
    """Make `root/latest` name `tag` (atomically)."""
    atomic_write_text(root / LATEST, tag + "\n")


def prune(root: Path, keep_last: int) -> None:
    """Remove complete checkpoints beyond the newest `keep_last`."""
    for tag in list_complete(root)[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding and verifying.

def list_complete(root: Path) -> list[str]:
    """Tags that have a manifest, oldest first (not verified: see `verify`)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of)


def verify(folder: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file.

    `share=(i, n)` hashes only every n-th file starting at i (sizes are checked for all), so n
    ranks can split the checksum work of one checkpoint.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it was never completed")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {err}") from None
    for index, (name, entry) in enumerate(sorted(manifest["files"].items())):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {entry['size']}")
        if checksums and index % share[1] == share[0] and file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest (corrupt)")


def resume_candidates(root: Path) -> list[str]:
    """Complete checkpoints, most preferred first: `latest`, then the others newest first."""
    candidates = list_complete(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.append(named)
    return list(reversed(candidates))


def find_resume_tag(root: Path, log: Callable[[str], None] = print, checksums: bool = True) -> Optional[str]:
    """The newest checkpoint that verifies (on one process): `latest` first, then newest first."""
    for tag in resume_candidates(root):
        try:
            verify(root / tag, checksums)
            return tag
        except CheckpointError as err:
            log(f"[checkpoint] skipping {tag}: {err}")
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a checkpoints root (its `latest`); CheckpointError
    for a path that does not exist or a root that holds no checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (a run writes its checkpoints to "
                              f"<run_dir>/checkpoints; run_dir defaults to runs/<config name>)")
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    if path.is_dir() and not (path / MANIFEST).is_file() and not _TAG_RE.match(path.name):
        complete = list_complete(path)
        if not complete:
            raise CheckpointError(f"{path} holds no complete checkpoint (no {LATEST}, no step_NNNNNNNN "
                                  f"folder with a {MANIFEST})")
        return path / complete[-1]
    return path


# ----------------------------------------------------------------------------------------------
# What run wrote a checkpoint.

def read_config(folder: Path) -> Config:
    """The resolved training config saved in a checkpoint folder."""
    path = folder / CONFIG_FILE
    return from_dict(upgrade_stored(yaml.safe_load(path.read_text())), Config, str(path))


def refuse_other_run(folder: Path, saved_stage: Any, stage: str) -> None:
    """Refuse resuming a checkpoint of another stage."""
    if saved_stage != stage:
        raise CheckpointError(f"{folder} is a checkpoint of stage {saved_stage}, this run trains stage "
                              f"{stage}: point checkpoint.dir or --resume elsewhere")


def resume_source(folder: Path) -> dict[str, Any]:
    """What a resume must know of a checkpoint before anything loads (cheap: no tensor is read).

    {"stage", "world_size", "zero_stage", "offload_optimizer", "precision",
    "reshardable": whether its rank files record their optimizer layouts (written by code that
    can resume it at another world size or ZeRO stage)}.
    """
    config_file = folder / CONFIG_FILE
    try:
        saved = yaml.safe_load(config_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{config_file} cannot be read: {err}") from None
    training = saved.get("training") or {}
    rank0 = torch.load(rank_state_path(folder, 0), map_location="cpu", weights_only=True, mmap=True) \
        if rank_state_path(folder, 0).is_file() else {}
    return {"stage": saved.get("stage"), "world_size": json.loads((folder / MANIFEST).read_text()).get("world_size"),
            "zero_stage": training.get("zero_stage"), "offload_optimizer": bool(training.get("offload_optimizer")),
            "precision": training.get("precision"), "reshardable": rank0.get("optimizer_layout") is not None}


def check_resume_target(folder: Path, stage: str, world_size: int, zero_stage: int,
                        offload_optimizer: bool = False) -> dict[str, Any]:
    """Refuse, before anything loads, a checkpoint that this run cannot resume; returns its
    `resume_source`. Another stage is refused; another world size or ZeRO stage is resumed by
    re-slicing, which needs rank files that record their optimizer layouts and no offloaded
    optimizer on either side."""
    source = resume_source(folder)
    refuse_other_run(folder, source["stage"], stage)
    if source["world_size"] in (None, world_size) and source["zero_stage"] in (None, zero_stage):
        return source
    was = f"{source['world_size']} ranks at ZeRO stage {source['zero_stage']}"
    now = f"{world_size} ranks at ZeRO stage {zero_stage}"
    if not source["reshardable"]:
        raise CheckpointError(f"{folder} was written by {was}, and its rank files record no optimizer layout "
                              f"(older code, or an optimizer the re-slice does not know), so it cannot be "
                              f"re-sliced for {now}: resume it at {was}, or export it and start a new run "
                              f"from it with training.init_from")
    if source["offload_optimizer"] or offload_optimizer:
        raise CheckpointError(f"config key 'training.offload_optimizer': re-slicing {folder} ({was}) for {now} "
                              f"is not supported with offloaded optimizer states (untested); resume it at {was}")
    return source
