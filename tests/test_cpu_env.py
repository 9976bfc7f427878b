"""imagen_train.utils.cpu_env: the allocator settings CPU training ranks start with."""

import os
import subprocess
import sys

from imagen_train.utils.cpu_env import CPU_MALLOC_TUNABLES, with_cpu_malloc_tunables
from train_helpers import train_env

# A training step in miniature: allocates and touches eight 8 MiB blocks (activations), frees them
# all, 20 times over; prints its minor page faults.
CHURN = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [libc.malloc(8 << 20) for _ in range(8)]
    for p in blocks:
        ctypes.memset(p, 1, 8 << 20)
    for p in blocks:
        libc.free(ctypes.c_void_p(p))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env: dict) -> int:
    proc = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_the_tunables_keep_freed_blocks_mapped_in_a_child():
    """Started with the setting, a process that frees its 64 MiB of blocks and allocates them
    again faults their pages in once; with glibc's defaults (mmap, then a heap trimmed on every
    free) it faults them in again on most rounds."""
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    pages = (64 << 20) // 4096
    assert _faults(plain) > 10 * pages
    assert _faults(with_cpu_malloc_tunables(plain)) < 2 * pages


def test_launch_environments_carry_the_tunables_and_keep_a_users_own():
    assert with_cpu_malloc_tunables({})["GLIBC_TUNABLES"] == CPU_MALLOC_TUNABLES
    assert with_cpu_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert train_env()["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
