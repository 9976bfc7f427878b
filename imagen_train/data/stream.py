"""One worker's raw sample stream with a resume cost that does not grow with the step.

A worker reads a sequence of shards; shard number k of it (its "shard counter") is a pure
function of (seed, layout, epoch, k), so a resume can open shard k directly instead of replaying
the k shards before it. Every raw sample is tagged `(k, j)`: shard counter and index in that
shard's tar order. The shuffle buffer remembers only the tags of the samples it holds, so its
state is a few integers per entry; on resume the worker re-reads the shards those tags name
(stopping each at its last needed sample) plus the start of the current shard, and continues.

What a resume reads is bounded by the buffer, not by the step: an entry waits in the buffer for
at most `2 * size` arrivals (see `ShuffleBuffer`), so the tags span at most the last `2 * size`
samples this worker took in, plus the unread remainder of the shards they start in and the read
part of the current one. `TailReader.reread` counts it.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np

Tag = tuple[int, int]  # (shard counter k, sample index j in that shard's tar order)


def seeded_rng(*parts: int) -> random.Random:
    """A Random seeded from a tuple of ints, with no collisions between nearby tuples."""
    return random.Random(int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0]))


def shard_split(urls: list[str], seed: int, rank: int, world_size: int, num_workers: int, worker: int,
                epoch: int, generation: int = 0) -> tuple[list[str], Optional[tuple[int, int]], tuple[int, ...]]:
    """One worker's share of `urls`: (its shards, (index, stride) of the sample-level split or None,
    the key that seeds their order).

    With at least ranks x workers shards a worker owns `urls[g::ranks*workers]`; with fewer,
    every worker reads the same sequence and keeps every (ranks x workers)-th sample. After a
    re-split (generation > 0) every key differs from those of the streams before it.
    """
    total, g = world_size * num_workers, rank * num_workers + worker
    tail = (generation,) if generation else ()
    if len(urls) >= total:
        return urls[g::total], None, (1, seed, rank, world_size, num_workers, worker, *tail, epoch)
    return list(urls), (g, total), (2, seed, epoch, *tail)


def epoch_order(own: list[str], key: tuple[int, ...]) -> list[str]:
    """The order in which a worker reads its shards in one finite epoch."""
    order = list(own)
    seeded_rng(*key).shuffle(order)
    return order


class ShuffleBuffer:
    """A seeded reservoir shuffle whose entries wait at most `2 * size` arrivals.

    While filling, samples are only stored. Once full, each new sample takes the slot of the one
    it sends out: a slot drawn at random (from an RNG keyed by the output's position, so no RNG
    state needs saving), unless the oldest entry has waited `max_age` arrivals, which then goes
    out instead. Without that cap a sample may sit in a reservoir indefinitely (an entry survives
    `a` arrivals with probability (1 - 1/size)**a), and the shards a resume must re-read would
    reach back without bound. With `max_age = 2 * size`, about e**-2 = 14 % of outputs are such
    forced ones; they are the oldest samples, so the order stays well mixed. `size` <= 1 passes
    samples straight through. `drain()` empties the buffer in a seeded random order (end of a
    finite epoch).
    """

    def __init__(self, size: int, key: tuple[int, ...]):
        self.size = size if size > 1 else 0
        self.max_age = 2 * self.size
        self.key = key
        self.entries: list[tuple[int, Tag, Any]] = []  # (arrival, tag, sample) per slot
        self.arrivals = 0   # samples pushed so far
        self.outputs = 0    # samples sent out so far: the position of the next output
        self._by_age: collections.deque[tuple[int, int]] = collections.deque()  # (arrival, slot)

    def _draw(self, n: int) -> int:
        return seeded_rng(*self.key, self.outputs).randrange(n)

    def push(self, tag: Tag, sample: Any) -> Optional[tuple[Tag, Any]]:
        """Store one sample; returns the (tag, sample) that goes out, or None while filling."""
        arrival = self.arrivals
        self.arrivals += 1
        if self.size == 0:
            self.outputs += 1
            return tag, sample
        if len(self.entries) < self.size:
            self._by_age.append((arrival, len(self.entries)))
            self.entries.append((arrival, tag, sample))
            return None
        while self.entries[self._by_age[0][1]][0] != self._by_age[0][0]:
            self._by_age.popleft()  # that slot was refilled since: stale
        oldest, slot = self._by_age[0]
        if arrival - oldest < self.max_age:
            slot = self._draw(self.size)
        _, out_tag, out = self.entries[slot]
        self.entries[slot] = (arrival, tag, sample)
        self._by_age.append((arrival, slot))
        self.outputs += 1
        return out_tag, out

    def drain(self) -> Iterator[tuple[Tag, Any]]:
        """Send out every stored sample, in a random order keyed by output position."""
        while self.entries:
            i = self._draw(len(self.entries))
            _, tag, sample = self.entries[i]
            self.entries[i] = self.entries[-1]
            self.entries.pop()
            self.outputs += 1
            yield tag, sample

    def state_dict(self) -> dict[str, Any]:
        """Counters and the (arrival, k, j) of every slot: plain ints, no sample bytes."""
        return {"arrivals": self.arrivals, "outputs": self.outputs,
                "entries": [[a, t[0], t[1]] for a, t, _ in self.entries]}

    def restore(self, state: dict[str, Any], samples: dict[Tag, Any]) -> int:
        """Refill the slots from re-read `samples` (by tag); returns how many could not be found.

        A missing sample (its shard failed on re-reading) leaves its slot out, and the buffer
        refills from the stream: training goes on, but that stream is no longer identical.
        """
        self.arrivals, self.outputs = int(state["arrivals"]), int(state["outputs"])
        self.entries = [(a, (k, j), samples[(k, j)]) for a, k, j in state["entries"] if (k, j) in samples]
        self._by_age = collections.deque(sorted((a, slot) for slot, (a, _, _) in enumerate(self.entries)))
        return len(state["entries"]) - len(self.entries)


class TailReader:
    """Raw samples of shard counters k, k+1, ... with the position to resume from.

    `shard_url(k)` names the k-th shard (None past the end of a finite sequence); `read(url)`
    yields its raw samples. With `split = (index, stride)` only every stride-th raw sample of
    the whole sequence is kept (every worker reads the same shards then), counted from `start`,
    the number of raw samples in the shards before the current one.
    """

    def __init__(self, shard_url: Callable[[int], Optional[str]], read: Callable[[str], Iterator[dict]],
                 split: Optional[tuple[int, int]], state: Optional[dict[str, Any]] = None,
                 on_empty: Optional[Callable[[int], None]] = None):
        self.shard_url, self.read, self.split, self.on_empty = shard_url, read, split, on_empty
        state = state or {}
        self.shard = int(state.get("shard", 0))        # counter of the shard being read
        self.in_shard = int(state.get("in_shard", 0))  # raw samples of it already taken in
        self.start = int(state.get("start", 0))        # raw samples in all shards before it
        self.empty_in_a_row = int(state.get("empty_in_a_row", 0))
        self.reread = {"samples": 0, "bytes": 0}       # raw samples read again to resume
        self._current: Optional[tuple[Iterator[dict[str, Any]], int]] = None  # open shard, read so far

    def state_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "in_shard": self.in_shard, "start": self.start,
                "empty_in_a_row": self.empty_in_a_row}

    def _count(self, raw: dict[str, Any]) -> None:
        self.reread["samples"] += 1
        self.reread["bytes"] += sum(len(v) for k, v in raw.items() if not k.startswith("__"))

    def _open(self, k: int) -> Optional[Iterator[dict[str, Any]]]:
        url = self.shard_url(k)
        return None if url is None else iter(self.read(url))

    def refetch(self, tags: list[Tag]) -> dict[Tag, Any]:
        """Re-read the samples named by `tags` (all before the saved position) to resume.

        Earlier shards are read up to their last wanted sample and closed; the current shard is
        read up to the saved position (a tar stream cannot seek) and kept open, so iteration
        continues from there without opening it twice.
        """
        wanted: dict[int, set[int]] = collections.defaultdict(set)
        for k, j in tags:
            wanted[k].add(j)
        found: dict[Tag, Any] = {}
        for k in sorted(wanted):
            if k >= self.shard:
                continue
            stream, last = self._open(k), max(wanted[k])
            if stream is None:
                continue
            for j, raw in enumerate(stream):
                self._count(raw)
                if j in wanted[k]:
                    found[(k, j)] = raw
                if j >= last:
                    break
            _close(stream)
        if self.in_shard > 0:
            stream = self._open(self.shard)
            j = 0
            while stream is not None and j < self.in_shard:
                raw = next(stream, None)
                if raw is None:
                    break
                self._count(raw)
                if j in wanted[self.shard]:
                    found[(self.shard, j)] = raw
                j += 1
            self._current = (stream, j)
        return found

    def __iter__(self) -> Iterator[tuple[Tag, dict[str, Any]]]:
        """(tag, raw) of this worker's samples from the saved position on, updating it as it goes."""
        while True:
            stream, got = self._current if self._current is not None else (self._open(self.shard), 0)
            self._current = None
            if stream is None:
                return
            if got < self.in_shard:  # no refetch before: skip the part read before the checkpoint
                for _ in range(self.in_shard - got):
                    raw = next(stream, None)
                    if raw is None:
                        break
                    self._count(raw)
                    got += 1
            for raw in stream:
                j = got
                got += 1
                self.in_shard = got
                if self.split is not None and (self.start + j) % self.split[1] != self.split[0]:
                    continue
                yield (self.shard, j), raw
            if got == 0:
                self.empty_in_a_row += 1
                if self.on_empty is not None:
                    self.on_empty(self.empty_in_a_row)
            else:
                self.empty_in_a_row = 0
            self.start += max(got, self.in_shard)
            self.shard, self.in_shard = self.shard + 1, 0


def _close(stream: Iterator[Any]) -> None:
    """Stop a shard read early (a generator: closes its file or kills its `pipe:` command)."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()
