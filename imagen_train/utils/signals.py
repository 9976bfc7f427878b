"""Signal names, the DataLoader worker hook that leaves stop signals to the rank, and output
that outlives its reader.

Launchers signal a rank's whole process tree (DeepSpeed's `launch.py` terminates every
descendant of each rank; a terminal's Ctrl-C reaches the whole process group). A DataLoader
worker killed that way makes its rank fail with "DataLoader worker ... is killed by signal"
before it can save, so workers ignore the stop signals and the rank decides: it saves, exits,
and its DataLoader then stops the workers.

A stop can also take away the rank's output: DeepSpeed's multi-node runner kills pdsh, so the
ssh sessions that carried every rank's stdout and stderr close, and the rank's next print
raises BrokenPipeError (Python ignores SIGPIPE) in the middle of the save the stop asked for.
`survive_closed_output` sends such a stream to a file instead and carries on.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterable, TextIO

# Signals that may never be caught or ignored, or that mean a crash, not a request.
_NOT_STOP_SIGNALS = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGCHLD"}
# What launchers send to a rank's process tree whatever the config says.
LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT")


def is_stop_signal_name(name: object) -> bool:
    """True for a name such as 'SIGUSR1' that a process can catch to save and stop."""
    return isinstance(name, str) and name in signal.Signals.__members__ and name not in _NOT_STOP_SIGNALS


def signal_numbers(names: Iterable[str]) -> list[signal.Signals]:
    """`['SIGTERM', 'SIGUSR1']` -> the signal enums, in order, without duplicates."""
    out: list[signal.Signals] = []
    for name in names:
        sig = signal.Signals[name]
        if sig not in out:
            out.append(sig)
    return out


def ignore_in_worker(names: tuple[str, ...], worker_id: int) -> None:
    """Ignore the stop signals and the launchers' in this (worker) process; see the module doc.

    Ignored dispositions survive exec, so `pipe:` readers the worker starts ignore them too.
    """
    for sig in signal_numbers((*names, *LAUNCHER_SIGNALS)):
        signal.signal(sig, signal.SIG_IGN)


def worker_init(names: Iterable[str]) -> Callable[[int], None]:
    """The DataLoader `worker_init_fn` that ignores stop signals; call it in the rank.

    It also registers (once) an exit hook in the calling process: at interpreter exit
    multiprocessing stops daemonic children (DataLoader workers) with SIGTERM and then joins
    them, which would wait forever on workers that ignore SIGTERM. The hook, registered after
    multiprocessing's and so run before it, SIGKILLs them instead (a SIGTERM did no cleanup
    in a worker either). The partial is picklable, for spawned workers.
    """
    _register_exit_hook()
    return functools.partial(ignore_in_worker, tuple(names))


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_kill_daemonic_children)


class _OutlivesReader:
    """A text stream whose write and flush survive EPIPE: see `survive_closed_output`."""

    def __init__(self, stream: TextIO, redirect: Callable[[int], None]):
        self._stream = stream
        self._redirect = redirect

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._redirect(self._stream.fileno())
            return self._stream.write(text)  # may repeat bytes the failed write had buffered

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._redirect(self._stream.fileno())
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_output(fallback: Callable[[], str]) -> None:
    """Once stdout's or stderr's reader is gone (EPIPE), point that file descriptor at the file
    `fallback()` names (appended to; /dev/null if it cannot be opened) and go on writing.

    Wraps sys.stdout and sys.stderr; call it first thing, so that loggers created later hold
    the wrappers. The descriptor itself is replaced (dup2), so output written below Python
    (C++ logs) follows it.
    """
    def redirect(fd: int) -> None:
        try:
            path = fallback()
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            target = os.open(os.devnull, os.O_WRONLY)
        os.dup2(target, fd)
        os.close(target)

    sys.stdout = _OutlivesReader(sys.stdout, redirect)
    sys.stderr = _OutlivesReader(sys.stderr, redirect)
