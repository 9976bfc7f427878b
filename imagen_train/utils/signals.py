"""Signal names and the DataLoader worker hook that leaves stop signals to the rank.

Launchers signal a rank's whole process tree (DeepSpeed's `launch.py` terminates every
descendant of each rank; a terminal's Ctrl-C reaches the whole process group). A DataLoader
worker killed that way makes its rank fail with "DataLoader worker ... is killed by signal"
before it can save, so workers ignore the stop signals and the rank decides: it saves, exits,
and its DataLoader then stops the workers.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from typing import Callable, Iterable

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
