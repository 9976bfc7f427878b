"""Stop requests: save at the next step boundary and exit, whichever process of the job is told.

A job is stopped by a signal to one of three kinds of process, and each must end in one complete
checkpoint from every rank (docs/fault-tolerance.md, "Preemption"):

- a rank (SLURM signals every task; `kill` by hand): the rank's handler sets the request;
- DeepSpeed's `launch.py` (it terminates each rank's process tree in turn): the same, and the
  DataLoader workers ignore the signal (`imagen_train.utils.signals.ignore_in_worker`);
- the `deepspeed` command (the runner) or `torchrun`: on one node the runner forwards nothing and
  just dies, leaving `launch.py` and the ranks running. So each rank watches its launcher
  processes and asks to stop when one of them is gone, however it died.

The trainer all-reduces `requested` at every step boundary (`dist.any_true`), so one rank's request
stops every rank at the same step.

Before the first step there is nothing to save, and a rank may be blocked where no Python code
runs for minutes (the rendezvous, a compiler, a peer's collective). So with
`exit_before_start` set (launch/train.py) a stop request before `started()` ends the process at
once: a watch thread, woken through `signal.set_wakeup_fd` even while the main thread is stuck
in C++, SIGKILLs the rank's child processes (DataLoader workers, a compiler, W&B's service) and
exits with that code. A non-zero code, so that the launcher (DeepSpeed's `launch.py`, torchrun,
`srun --kill-on-bad-exit`) also ends the ranks that wait for this one in the rendezvous.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from typing import Iterable, Optional

import psutil

from imagen_train.utils.signals import signal_numbers

# How launcher processes are recognised from their command line: script base names and
# `python -m` module names (the runner is `bin/deepspeed`; it starts `-m deepspeed.launcher.launch`).
_LAUNCHER_SCRIPTS = ("deepspeed", "deepspeed.pt", "torchrun")
_LAUNCHER_MODULES = ("deepspeed.launcher.runner", "deepspeed.launcher.launch",
                     "torch.distributed.run", "torch.distributed.launch")
# launch/train.py's exit code for a stop before the first step (docs/fault-tolerance.md, "Exit codes").
STOPPED_BEFORE_START = 6


def launcher_name(cmdline: list[str]) -> Optional[str]:
    """The launcher a command line runs (e.g. 'deepspeed.launcher.launch'), or None."""
    # argv[0] is the interpreter (or the script itself, run by its shebang); the script or the
    # module comes within the next few arguments (`python -u -m module`).
    for i, arg in enumerate(cmdline[:5]):
        if os.path.basename(arg) in _LAUNCHER_SCRIPTS:
            return os.path.basename(arg)
        if arg in _LAUNCHER_MODULES and i > 0 and cmdline[i - 1] == "-m":
            return arg
    return None


def launcher_ancestors(pid: Optional[int] = None) -> list[tuple[psutil.Process, str]]:
    """The unbroken chain of launcher processes above `pid` (this process), nearest first.

    Under `deepspeed`: [launch.py, the runner]; under torchrun: [torchrun]; started by a shell,
    a scheduler or a test: []. Only launchers are watched, so a plain `python launch/train.py`
    whose shell exits (nohup) keeps training.
    """
    chain = []
    try:
        proc = psutil.Process(pid or os.getpid()).parent()
        while proc is not None and proc.pid > 1:
            name = launcher_name(proc.cmdline())
            if name is None:
                break
            chain.append((proc, name))
            proc = proc.parent()
    except psutil.Error:  # an ancestor exited while we looked: watch what was found
        pass
    return chain


def _gone(proc: psutil.Process) -> bool:
    """Exited (a zombie waiting for its parent counts as exited; a reused pid does not fool it)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def kill_children() -> None:
    """SIGKILL every descendant of this process (before an exit that leaves nothing to save).

    A run-time build of a C++ op (DeepSpeed's CPU comm op: torch runs `ninja` in the build
    folder, holding that folder's `lock` file) would leave the lock behind, and every later
    run would wait on it for ever: the lock of a killed build is removed.
    """
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    locks = []
    for child in children:
        try:
            if child.name() == "ninja":
                locks.append(os.path.join(child.cwd(), "lock"))
        except psutil.Error:
            pass
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    for lock in locks:
        try:
            os.unlink(lock)
        except OSError:
            pass


class StopRequest:
    """Set by a stop signal or by a launcher's death; read by the trainer at step boundaries.

    `install()` catches `signal_names` (the signal handler only sets a flag: no printing, which
    can fail re-entering a stream the main thread is writing) and starts a daemon thread that
    wakes on those signals and polls the launcher processes above this one (`watch_launchers`)
    every `poll_s`. Further signals after the first are ignored too: a launcher and a terminal
    may both signal the same rank, and the save must not be cut short by the second.
    `exit_before_start`: the exit code for a stop before `started()` (see the module doc);
    None: a stop is always left to the trainer. `restore()` undoes all of it.
    """

    def __init__(self, signal_names: Iterable[str] = ("SIGTERM", "SIGINT", "SIGUSR1"),
                 watch_launchers: bool = True, poll_s: float = 1.0, exit_before_start: Optional[int] = None):
        self.signals = signal_numbers(signal_names)
        self.watch_launchers = watch_launchers
        self.poll_s = poll_s
        self.exit_before_start = exit_before_start
        self.requested = False
        self.reason: Optional[str] = None
        self.launchers: list[tuple[psutil.Process, str]] = []
        self._starting = exit_before_start is not None
        self._start_lock = threading.Lock()
        self._previous: dict[signal.Signals, object] = {}
        self._wakeup: Optional[tuple[socket.socket, socket.socket]] = None
        self._previous_wakeup = -1
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def request(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
            self.requested = True

    def _handle(self, signum, frame) -> None:
        self.request(f"{signal.Signals(signum).name} received")

    def install(self) -> "StopRequest":
        """Catch the signals (main thread only) and start the watch thread; returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self._starting:
            # The Python handler runs only when the main thread runs Python code; the wakeup
            # socket hears of the signal at once, whatever the main thread is doing.
            self._wakeup = socket.socketpair()
            for end in self._wakeup:
                end.setblocking(False)
            self._previous_wakeup = signal.set_wakeup_fd(self._wakeup[1].fileno(), warn_on_full_buffer=False)
        if self.watch_launchers:
            self.launchers = launcher_ancestors()
        if self.launchers or self._wakeup is not None:
            self._thread = threading.Thread(target=self._watch, name="stop-watch", daemon=True)
            self._thread.start()
        return self

    def started(self) -> None:
        """The training loop begins: from now on a stop is saved at a step boundary, never an exit."""
        with self._start_lock:
            self._starting = False

    def _exit_if_starting(self) -> None:
        with self._start_lock:  # started() waits for this: no exit once the loop has begun
            if not self._starting:
                return
            message = (f"[train] rank {os.environ.get('RANK', '0')}: stop before the first step "
                       f"({self.reason}): nothing to save; exiting\n")
            try:
                os.write(2, message.encode())  # not print(): the main thread may hold stderr's lock
            except OSError:  # the terminal or the ssh session is gone
                pass
            kill_children()
            os._exit(self.exit_before_start)

    def _watch(self) -> None:
        parent = os.getppid()
        while not self._done.is_set():
            self._wait_for_signal()
            if not self.requested:
                self._check_launchers(parent)
            if self.requested:
                self._exit_if_starting()

    def _wait_for_signal(self) -> None:
        """Sleep up to poll_s; a caught signal that arrives meanwhile is a request."""
        if self._wakeup is None:
            self._done.wait(self.poll_s)
            return
        ready, _, _ = select.select([self._wakeup[0]], [], [], self.poll_s)
        if not ready:
            return
        try:
            data = self._wakeup[0].recv(64)
        except OSError:  # closed by restore()
            return
        for signum in data:
            if signum in self.signals:
                self.request(f"{signal.Signals(signum).name} received")

    def _check_launchers(self, parent: int) -> None:
        for proc, name in self.launchers:
            if _gone(proc):
                self.request(f"launcher {name} (pid {proc.pid}) exited")
                return
        if self.launchers and os.getppid() != parent:  # the parent launcher died; we were re-parented
            self.request(f"launcher {self.launchers[0][1]} (pid {parent}) exited")

    def restore(self) -> None:
        """Put the previous signal handlers back and stop the watch thread."""
        self._done.set()
        self.started()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s)
            self._thread = None
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for end in self._wakeup:
                end.close()
            self._wakeup = None

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
