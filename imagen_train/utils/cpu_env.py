"""The environment of training ranks on a CPU: glibc's allocator kept from handing memory back.

With its defaults glibc's malloc serves large blocks with mmap and trims the top of the heap when
a block is freed, so every training step maps its activations and gradients afresh and the kernel
zero-fills each page on first touch. On the CPU quickstart's 64 px stage that was 1.7 M minor page
faults and 12 % system time in 60 steps. A fixed mmap threshold of 32 MiB (glibc's largest; it also
stops the threshold from moving) and a 1 GiB trim threshold keep the freed memory in the process
for the next step: docs/benchmarks.md ("glibc's allocator on CPU ranks"), bench/malloc_tunables.py.

The setting is read by the dynamic loader when a process starts, so it goes into the environment of
the processes a launcher starts, never into the running one.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def with_cpu_malloc_tunables(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """`env` (default: os.environ) with CPU_MALLOC_TUNABLES; a GLIBC_TUNABLES already set is kept."""
    out = dict(os.environ if env is None else env)
    out.setdefault("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
    return out
