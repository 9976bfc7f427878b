"""Atomic checkpoint folders: written under a staging name, verified, renamed, then pointed to.

Layout of `<checkpoint dir>`:
    step_00001000/            a complete checkpoint (DeepSpeed files + our per-rank state)
        manifest.json         every file's size and sha256, written last before the rename
    latest                    the tag of the newest complete checkpoint, replaced atomically
    .staging-step_00002000/   a checkpoint being written; never read, removed on the next save

A crash at any point leaves the previous complete checkpoint and `latest` intact. Folders must
be on storage every rank sees (a shared filesystem on multi-node runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from imagen_train.utils import dist

MANIFEST = "manifest.json"
LATEST = "latest"
STAGING_PREFIX = ".staging-"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or corrupt; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full or failing disk); the previous one is intact."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = _TAG_RE.match(tag)
    if not match:
        raise CheckpointError(f"'{tag}' is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(match.group(1))


def staging_tag(step: int) -> str:
    return STAGING_PREFIX + tag_for(step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_rank_state(folder: Path, state: dict) -> None:
    """This rank's own state (EMA shard, RNG, data position) into the staging folder."""
    path = folder / f"trainer_state_rank{dist.rank():05d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_rank_state(folder: Path) -> dict:
    path = folder / f"trainer_state_rank{dist.rank():05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: was the checkpoint written by a run with "
                              f"another number of ranks?")
    return torch.load(path, map_location="cpu", weights_only=True)


def commit(root: Path, step: int, keep_last: int) -> Path:
    """Seal the staging folder of `step` on every rank: hash, manifest, rename, point, prune.

    Call on every rank after all of them wrote their files. Ranks hash a share of the files
    each, so the cost is spread; rank 0 writes the manifest, renames and moves `latest`.
    """
    staging = root / staging_tag(step)
    final = root / tag_for(step)
    dist.barrier()
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    mine = {f: {"size": (staging / f).stat().st_size, "sha256": _sha256(staging / f)}
            for i, f in enumerate(files) if i % dist.world_size() == dist.rank()}
    if dist.is_initialized():
        gathered: list = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if dist.is_main():
        entries = {}
        for part in gathered:
            entries.update(part)
        _atomic_write_text(staging / MANIFEST, json.dumps(
            {"step": step, "world_size": dist.world_size(), "files": entries}, indent=1))
        if final.exists():  # an older attempt at the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep_last)
    dist.barrier()
    return final


def prepare_staging(root: Path, step: int) -> Path:
    """An empty staging folder for `step` (rank 0 clears leftovers; everyone waits)."""
    staging = root / staging_tag(step)
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
        staging.mkdir()
    dist.barrier()
    return staging


def _prune(root: Path, keep_last: int) -> None:
    complete = list_complete(root)
    for tag in complete[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)


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
        if checksums and index % share[1] == share[0] and _sha256(path) != entry["sha256"]:
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


def find_resume_tag(root: Path, log=print, checksums: bool = True) -> str | None:
    """The newest checkpoint that verifies (on one process): `latest` first, then newest first."""
    for tag in resume_candidates(root):
        try:
            verify(root / tag, checksums)
            return tag
        except CheckpointError as err:
            log(f"[checkpoint] skipping {tag}: {err}")
    return None


def verify_shared(folder: Path) -> str | None:
    """Verify `folder` with the checksum work split over the ranks; every rank gets the same answer.

    Returns None when the checkpoint is intact, else the first error message of any rank. Call
    on every rank (it enters a collective). Reading a multi-GB checkpoint once in total, instead
    of once per rank, is what keeps a many-rank resume from hammering shared storage.
    """
    try:
        verify(folder, checksums=True, share=(dist.rank(), dist.world_size()))
        error = None
    except CheckpointError as err:
        error = str(err)
    if not dist.is_initialized():
        return error
    gathered: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, error)
    return next((e for e in gathered if e), None)
