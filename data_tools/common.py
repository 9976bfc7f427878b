"""Shard writing, progress bars and summaries shared by the data_tools commands."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


def progress(total: Optional[int], desc: str, enabled: bool = True, unit: str = "sample") -> tqdm:
    """A tqdm bar on stderr showing samples/s and ETA (ETA only when `total` is known)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, dynamic_ncols=True,
                disable=not enabled, file=sys.stderr, smoothing=0.1)


def print_summary(summary: dict[str, Any]) -> None:
    """The command's JSON summary, last thing on stdout."""
    print(json.dumps(summary, indent=2, sort_keys=False, default=str), flush=True)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one in-memory file with fixed metadata, so equal inputs give byte-equal tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = "imagen"
    tar.addfile(info, io.BytesIO(data))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fobj:
        fobj.write(data)
        fobj.flush()
        os.fsync(fobj.fileno())
    os.replace(tmp, path)


def write_tar_atomic(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write `(key, {ext: bytes})` samples to `path` via a temporary name and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fobj:
        with tarfile.open(fileobj=fobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, entries in samples:
                for ext, data in entries.items():
                    add_member(tar, f"{key}.{ext}", data)
        fobj.flush()
        os.fsync(fobj.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Buffers samples and writes `00000.tar`, `00001.tar`, ... of `shard_size` samples each."""

    def __init__(self, out_dir: str | Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be positive, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.pending: list[tuple[str, dict[str, bytes]]] = []
        self.shards: list[str] = []
        self.num_samples = 0

    def write(self, key: str, entries: dict[str, bytes]) -> None:
        """Queue one sample; a full shard is written at once."""
        self.pending.append((key, entries))
        self.num_samples += 1
        if len(self.pending) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending samples (if any) as the next shard."""
        if not self.pending:
            return
        path = self.out_dir / f"{len(self.shards):05d}.tar"
        write_tar_atomic(path, self.pending)
        self.shards.append(str(path))
        self.pending = []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.flush()


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def rate(n: int, seconds: float) -> float:
    """n / seconds, rounded, safe at zero."""
    return round(n / seconds, 2) if seconds > 0 else 0.0
