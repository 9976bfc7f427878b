"""Shard lists and raw tar reading, shared by the loader and `data_tools`.

A shard spec is a brace pattern (`data/{00000..00099}.tar`), several joined by `::`, a list
file (one shard a line, `#` comments; recognised by not ending in `.tar`), a local path or a
`pipe:` command (`pipe:aws s3 cp s3://b/00001.tar -`). Samples come out as raw bytes; nothing
is decoded here, which is what lets the loader skip consumed samples cheaply on resume.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import webdataset as wds
from webdataset.shardlists import expand_urls


def expand_shards(spec: str | list[str]) -> list[str]:
    """The list of shard URLs named by a spec (brace pattern, `::` list, list file, or list)."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s)]
    spec = spec.strip()
    if not spec:
        raise ValueError("empty shard spec")
    if not spec.startswith("pipe:") and not spec.endswith(".tar") and "::" not in spec \
            and "{" not in spec and Path(spec).is_file():
        base = Path(spec).parent
        urls = []
        for line in Path(spec).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                if not line.startswith("pipe:") and "://" not in line and not os.path.isabs(line):
                    line = str(base / line)  # relative to the list file
                urls.extend(expand_urls(line))
        if not urls:
            raise ValueError(f"shard list file {spec} names no shards")
        return urls
    return expand_urls(spec)


def open_shard(url: str) -> IO[bytes]:
    """A readable binary stream for a local path, `pipe:` command or any URL webdataset opens."""
    if url.startswith("pipe:") or "://" in url:
        return wds.gopen(url, "rb")
    return open(url, "rb")


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into (sample key, extension) the webdataset way (first dot of basename)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes a header cut short: tarfile's stream mode otherwise ends silently there."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError):
            tar.cut_short = True  # a whole tar always ends with zero blocks, never like this
            raise


def iter_raw_samples(url: str, on_error: Optional[Callable[[str, str, str], None]] = None,
                     keep: Optional[Callable[[str], bool]] = None) -> Iterator[dict[str, Any]]:
    """Yield `{"__key__", "__url__", ext: bytes, ...}` per sample of one shard, in tar order.

    A shard that cannot be opened or is cut short reports `on_error(url, key, message)` once
    (key "" for the shard itself, or the sample that was cut) and ends; samples before the
    damage are still yielded. `keep(ext)` (default: all) chooses which entries to read.
    """
    report = on_error or (lambda *_: None)
    current: dict[str, Any] | None = None
    try:
        stream = open_shard(url)
    except OSError as err:
        report(url, "", f"cannot open shard: {err}")
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            tar.cut_short = False
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_key(member.name)
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if keep is not None and not keep(ext):
                    continue
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                current[ext] = data
            if tar.cut_short:
                raise tarfile.ReadError("tar ends without its end-of-archive blocks")
    except (tarfile.TarError, OSError, EOFError) as err:
        # The sample being read when the tar broke may be incomplete: drop it, name it.
        report(url, current["__key__"] if current else "", f"truncated or unreadable tar: {err}")
        current = None
    finally:
        stream.close()
    if current is not None:
        yield current
