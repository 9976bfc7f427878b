"""Rank helpers: who am I, print on rank 0, agree across ranks, leave. Safe without a process group.

Every collective here adds what this rank receives from the other ranks to a per-process
counter (`received_bytes()`): the payload the collective's result is made of, not counting this
rank's own part (an all-gather of n bytes per rank: (world - 1) x n; a broadcast: n on every
rank but the source; an all-reduce: (world - 1) x n, though a ring moves about 2n). Periodic
evaluation logs the difference over one evaluation as `eval/received_bytes`.
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
from typing import NoReturn, Optional

import torch
import torch.distributed as dist


_received_bytes = 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def received_bytes() -> int:
    """Bytes this process has received from other ranks through this module's collectives."""
    return _received_bytes


def _count(nbytes: int) -> None:
    global _received_bytes
    _received_bytes += int(nbytes)


def rank() -> int:
    """Global rank (from the process group, else RANK, else 0)."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks (from the process group, else WORLD_SIZE, else 1)."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed."""
    if is_main():
        print(*args, **kwargs, flush=True)


def init_from_env() -> None:
    """Join a process group when launched with torchrun (gloo on a CPU, nccl on GPUs); else nothing.

    For entry points without DeepSpeed (evaluation); training joins through
    `training.engine.init_distributed`, which DeepSpeed's own communication needs.
    """
    if world_size() > 1 and not is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)


def shutdown() -> None:
    """Destroy the process group, if any, once the run is over.

    Torch shuts every backend down here (NCCL's communicators on GPUs), while the interpreter is
    whole. It does not free groups that others still hold, DeepSpeed's among them, so gloo's
    threads can outlive it; `exit_process` is what keeps them from aborting a finished rank
    (docs/design-notes.md). Call it only where every rank has finished its collectives: after a
    run, not after a lost peer.
    """
    if is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Leave with `code` after the atexit handlers, without the interpreter's teardown.

    Call it once the run's own state is safe (checkpoint written, logger closed, process group
    destroyed). Even then a DeepSpeed run keeps its gloo process groups alive: the engine, ZeRO-3
    parameters and `torch.distributed.nn.functional`'s default arguments hold them past
    `destroy_process_group()`, so gloo's worker threads are stopped only while the interpreter
    frees its modules. There, now and then, a rank that had finished aborted with SIGABRT
    ("terminate called without an active exception") and the launcher failed the whole job
    (docs/design-notes.md). The atexit handlers still run (logging, DataLoader workers,
    temporary folders); what is skipped is the freeing of modules and of native objects.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any rank (so ranks never take different branches)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    _count((world_size() - 1) * t.nbytes)
    return bool(t.item() > 0)


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order (trusted, in-process data only)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    _count(sum(len(pickle.dumps(o)) for r, o in enumerate(out) if r != rank()))
    return out


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks, on every rank (a new tensor; `t` itself without a group)."""
    if not is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    _count((world_size() - 1) * t.nbytes)
    return t / world_size()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (trusted, in-process data only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    if rank() != src:
        _count(len(pickle.dumps(box[0])) + 8)  # the payload and its length
    return box[0]


def broadcast_tensor(t: Optional[torch.Tensor], src: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """`t` from rank `src` on every rank, on `device` (other ranks pass None: shape and dtype come
    with it). The tensor travels as itself, not pickled."""
    if not is_initialized():
        assert t is not None, "broadcast_tensor without a process group needs the tensor"
        return t.to(device)
    meta = broadcast_object((tuple(t.shape), t.dtype) if rank() == src else None, src=src)
    out = t.to(device).contiguous() if rank() == src else torch.empty(meta[0], dtype=meta[1], device=device)
    dist.broadcast(out, src=src)
    if rank() != src:
        _count(out.nbytes)
    return out


def all_gather_equal(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape and dtype on all ranks), stacked: (world, *t.shape).

    One collective straight into one output buffer (no per-rank copies): for large transfers in
    bounded pieces, where `all_gather_tensor`'s size exchange and padding are not needed.
    """
    if not is_initialized():
        return t[None]
    out = torch.empty((world_size(), *t.shape), dtype=t.dtype, device=t.device)
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; gloo wants a flat output.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), t.contiguous().view(-1))
    _count((world_size() - 1) * t.nbytes)
    return out


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank except dim 0 may differ) along dim 0."""
    if not is_initialized():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    max_rows = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    _count((world_size() - 1) * (sizes[0].nbytes + padded.nbytes))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
