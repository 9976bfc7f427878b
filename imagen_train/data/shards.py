"""Shard lists and raw tar reading, shared by the loader and `data_tools`.

A shard spec is a brace pattern (`data/{00000..00099}.tar`), several joined by `::`, a list
file (one shard a line, `#` comments; recognised by not ending in `.tar`), a local path or a
`pipe:` command (`pipe:aws s3 cp s3://b/00001.tar -`). Samples come out as raw bytes; nothing
is decoded here, which keeps what a resume re-reads (data/stream.py) cheap.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import webdataset as wds
from webdataset.shardlists import expand_urls

log = logging.getLogger(__name__)


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


class _PipeStream:
    """stdout of a `pipe:` command; a read that waits `timeout_s` for any byte kills the command.

    Errors surface as OSError: TimeoutError for a stall, OSError at close for a non-zero exit.
    """

    def __init__(self, command: str, timeout_s: Optional[float]):
        self.command, self.timeout_s = command, timeout_s
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.timed_out = False
        self._closed = False
        self._eof = False
        self._reading_since: Optional[float] = None
        self._done = threading.Event()
        if timeout_s:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            since = self._reading_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.timed_out = True
                self._kill()
                return

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and whatever it started
        except (ProcessLookupError, PermissionError):
            pass

    def read(self, n: int = -1) -> bytes:
        self._reading_since = time.monotonic()
        try:
            data = self.proc.stdout.read(n)
        finally:
            self._reading_since = None
        if self.timed_out:
            raise TimeoutError(f"no data for {self.timeout_s} s from pipe:{self.command}")
        if not data:
            self._eof = True
        return data

    def close(self) -> None:
        """Stop the command (if still running) and raise OSError if it failed."""
        if self._closed:
            return
        self._closed = True
        self._done.set()
        if self._eof:  # its output ended: it is exiting, take its status
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finished = self.proc.poll() is not None
        if not finished:
            self._kill()  # closed early (e.g. a reader that stopped): not a failure
        self.proc.stdout.close()
        rc = self.proc.wait()
        if self.timed_out:
            raise TimeoutError(f"no data for {self.timeout_s} s from pipe:{self.command}")
        if finished and rc != 0:
            raise OSError(f"pipe:{self.command} exited with status {rc}")


def open_shard(url: str, timeout_s: Optional[float] = None) -> IO[bytes]:
    """A readable binary stream for a local path, `pipe:` command or any URL webdataset opens.

    `timeout_s` bounds how long a `pipe:` read may wait for data (None: forever).
    """
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):], timeout_s)  # type: ignore[return-value]
    if "://" in url:
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


class _ShardError(Exception):
    """Reading a shard failed; `transient` errors (I/O, remote streams) are worth retrying."""

    def __init__(self, key: str, message: str, transient: bool):
        super().__init__(message)
        self.key, self.message, self.transient = key, message, transient


def _read_once(url: str, keep: Optional[Callable[[str], bool]], timeout_s: Optional[float]
               ) -> Iterator[dict[str, Any]]:
    """One pass over a shard: its complete samples, then _ShardError if it broke."""
    remote = url.startswith("pipe:") or "://" in url
    current: dict[str, Any] | None = None
    try:
        stream = open_shard(url, timeout_s)
    except OSError as err:
        raise _ShardError("", f"cannot open shard: {err}", transient=True) from None
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
        stream.close()  # a pipe command's exit status is only known here
    except (tarfile.TarError, OSError, EOFError) as err:
        # The sample being read when the tar broke may be incomplete: drop it, name it. A
        # failed pipe command's status says more than the tar it cut short.
        try:
            stream.close()
        except OSError as close_err:
            err = close_err
        # A local file that is cut short stays so; an I/O error, or a remote stream that broke
        # (its tar looks cut short too), may read fine next time.
        transient = remote or (isinstance(err, OSError) and not isinstance(err, tarfile.TarError))
        raise _ShardError(current["__key__"] if current else "", f"truncated or unreadable tar: {err}",
                          transient) from None
    finally:
        _close_quietly(stream)  # a reader that stopped early
    if current is not None:
        yield current


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def iter_raw_samples(url: str, on_error: Optional[Callable[[str, str, str], None]] = None,
                     keep: Optional[Callable[[str], bool]] = None, retries: int = 0,
                     backoff_s: float = 1.0, timeout_s: Optional[float] = None
                     ) -> Iterator[dict[str, Any]]:
    """Yield `{"__key__", "__url__", ext: bytes, ...}` per sample of one shard, in tar order.

    A read that fails with an I/O error, a timeout (`timeout_s`, `pipe:` only) or a broken
    remote stream is retried up to `retries` times after `backoff_s * 2**attempt` seconds,
    continuing after the samples already yielded, so the stream is the same as without the
    fault. A shard that cannot be read then, or is cut short, reports `on_error(url, key,
    message)` once (key "" for the shard itself, or the sample that was cut) and ends; samples
    before the damage are still yielded. `keep(ext)` (default: all) chooses which entries to read.
    """
    report = on_error or (lambda *_: None)
    done = 0
    for attempt in range(retries + 1):
        seen = 0
        try:
            for sample in _read_once(url, keep, timeout_s):
                seen += 1
                if seen > done:
                    done += 1
                    yield sample
            return
        except _ShardError as err:
            if not err.transient or attempt == retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                report(url, err.key, err.message + tries)
                return
            wait = backoff_s * 2 ** attempt
            log.warning("reading %s failed (%s); retry %d of %d in %.1f s", url, err.message,
                        attempt + 1, retries, wait)
            time.sleep(wait)
