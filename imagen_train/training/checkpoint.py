"""Atomic checkpoints across ranks: written under a staging name, verified, renamed, pointed to.

The folder layout, manifests and verification are `imagen_train.artifacts.checkpoints`; this
module adds what needs every rank: preparing the staging folder, writing one step's checkpoint
(`save`), splitting the hashing and the verification over the ranks, and sealing. A crash at
any point leaves the previous complete checkpoint and `latest` intact. Folders must be on
storage every rank sees (a shared filesystem on multi-node runs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from imagen_train.artifacts.checkpoints import (CONFIG_FILE, LATEST, MANIFEST, STAGING_PREFIX, CheckpointError,
                                                CheckpointWriteError, list_complete, manifest_entry,
                                                point_latest, prune, read_rank_state, staging_tag, tag_for,
                                                verify, write_manifest, write_rank_state)
from imagen_train.config import Config, save_config
from imagen_train.training.engine_api import Engine
from imagen_train.utils import dist

__all__ = ["LATEST", "MANIFEST", "STAGING_PREFIX", "CheckpointError", "CheckpointWriteError", "commit",
           "list_complete", "load_rank_state", "prepare_staging", "save", "save_rank_state", "tag_for",
           "verify_shared"]


def save(root: Path, step: int, engine: Engine, rank_state: Callable[[], dict[str, Any]], cfg: Config,
         previous: Optional[Path]) -> Path:
    """Write, seal and point to the checkpoint of `step` on every rank; a failed write raises loudly.

    The folder holds the engine's files, then each rank's `rank_state()` (taken after the
    engine's save, as the run goes on from there) and the config. A rank whose write fails
    (full disk, I/O error) raises CheckpointWriteError naming the checkpoint and the cause, and
    removes the staging folder; the other ranks then fail at the next collective (or its
    timeout). `previous` (the last checkpoint, for the message) and `latest` are never touched
    before the new checkpoint is complete.
    """
    staging = prepare_staging(root, step)
    try:
        engine.save(staging)
        save_rank_state(staging, rank_state())
        if dist.is_main():
            save_config(cfg, staging / CONFIG_FILE)
    except Exception as err:  # torch.save reports a full disk as RuntimeError, not OSError
        shutil.rmtree(staging, ignore_errors=True)  # give the space back; never read
        raise CheckpointWriteError(
            f"rank {dist.rank()} could not write checkpoint step {step} to {staging}: "
            f"{type(err).__name__}: {err}. The previous checkpoint {previous or '(none)'} and "
            f"{root / LATEST} are intact") from err
    return commit(root, step, cfg.checkpoint.keep_last)


def save_rank_state(folder: Path, state: dict) -> None:
    """This rank's own state (EMA shard, RNG, data position) into the staging folder."""
    write_rank_state(folder, dist.rank(), state)


def load_rank_state(folder: Path) -> dict:
    """This rank's own state from a checkpoint folder."""
    return read_rank_state(folder, dist.rank())


def commit(root: Path, step: int, keep_last: int) -> Path:
    """Seal the staging folder of `step` on every rank: hash, manifest, rename, point, prune.

    Call on every rank after all of them wrote their files. Ranks hash a share of the files
    each, so the cost is spread; rank 0 writes the manifest, renames and moves `latest`.
    """
    staging = root / staging_tag(step)
    final = root / tag_for(step)
    dist.barrier()
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    mine = {f: manifest_entry(staging / f) for i, f in enumerate(files) if i % dist.world_size() == dist.rank()}
    gathered = dist.all_gather_object(mine)
    if dist.is_main():
        entries = {}
        for part in gathered:
            entries.update(part)
        write_manifest(staging, step, dist.world_size(), entries)
        if final.exists():  # an older attempt at the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(staging, final)
        point_latest(root, final.name)
        prune(root, keep_last)
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


def verify_shared(folder: Path) -> Optional[str]:
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
    return next((e for e in dist.all_gather_object(error) if e), None)
