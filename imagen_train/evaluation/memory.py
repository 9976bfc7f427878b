"""Peak memory of a block of work: CUDA's max allocated on a GPU, RSS growth on a CPU."""

from __future__ import annotations

import gc
import os
import threading
import time

import torch


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_gib` and `m.kind`.

    GPU: torch.cuda.max_memory_allocated after a reset (weights, activations, everything torch
    allocated on the device during the block). CPU: the highest RSS seen (polled every 5 ms)
    minus the RSS at entry, a rough figure that also counts allocator caching.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_gib = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_growth"
        self._stop = threading.Event()
        self._peak = 0
        self._base = 0
        self._thread = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss_bytes())
            self.peak_gib = max(0, self._peak - self._base) / 2**30


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that a timer sees it done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device | str) -> None:
    """Return freed memory: garbage-collect and, on a GPU, empty torch's cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
