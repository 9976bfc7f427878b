"""Continuing a saved data stream under another layout: ranks, workers, shards or buffer size.

The exact resume of `TrainLoader.load_state_dict` needs the layout that made the streams
(seed, ranks, workers, shuffle buffer, shard list). When any of it changed, every old rank's
loader state is read and the stream goes on from the saved position, re-split over the new
layout (`plan_resplit`):

- Finite epochs (`data.resampled: false`): the rest of the epoch is the shards that no old
  worker had started (found by replaying each old worker's shard order up to its saved shard
  counter), split over the new ranks and workers as usual. No sample is read twice within the
  epoch. Dropped for that epoch: the samples waiting in the old workers' shuffle buffers
  (counted exactly) and the unread rest of each shard an old worker had started (at most one
  per old worker; named); with fewer shards than ranks x workers (every worker reads every
  shard and keeps one sample in ranks x workers) also the samples of started shards that the
  other old workers had not reached. Shards added to `data.train_shards` join the epoch.
- Resampled streams (the default): shards are drawn with replacement and there is no epoch to
  keep; the draws go on from new seeds (the re-split count, `generation`, enters every seed
  key, so no stream of an earlier layout is replayed). The buffered samples are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from imagen_train.data.stream import epoch_order, shard_split


@dataclass
class Resplit:
    epoch: int
    generation: int
    skip: Optional[set[int]]     # indices of the new shard list left out of this epoch
    note: str                    # what changed and what it cost, for the run's log


def mask_to_set(mask: Optional[str]) -> set[int]:
    """Shard indices from the hex bitmask a loader state stores (None: none)."""
    bits = int(mask, 16) if mask else 0
    return {i for i in range(bits.bit_length()) if bits >> i & 1}


def set_to_mask(indices: Optional[set[int]]) -> Optional[str]:
    """A set of shard indices as a compact, JSON-safe hex bitmask (10,000 shards: 2.5 KB)."""
    return format(sum(1 << i for i in indices), "x") if indices else None


def _started(state: dict[str, Any], urls: list[str], epoch: int) -> tuple[set[str], int, list[str]]:
    """Shards one old rank's workers had started in `epoch`, samples in their buffers, shards
    they had partly read."""
    skipped = mask_to_set(state.get("skip"))
    started = {urls[i] for i in skipped if i < len(urls)}
    effective = [u for i, u in enumerate(urls) if i not in skipped]
    buffered, partial = 0, []
    for worker, ws in state["workers"].items():
        if int(ws["epoch"]) != epoch:
            continue
        own, _, key = shard_split(effective, state["seed"], state["rank"], state["world_size"],
                                  state["num_workers"], int(worker), epoch, int(state.get("generation", 0)))
        order = epoch_order(own, key)
        reader = ws.get("reader") or {}
        shard, in_shard = int(reader.get("shard", 0)), int(reader.get("in_shard", 0))
        if ws["done"]:
            started.update(order)
            continue
        started.update(order[: shard + (1 if in_shard > 0 else 0)])
        buffered += len((ws.get("buffer") or {}).get("entries", []))
        if in_shard > 0 and shard < len(order):
            partial.append(order[shard])
    return started, buffered, partial


def plan_resplit(states: list[dict[str, Any]], urls: list[str], resampled: bool, layout: str,
                 changes: list[str]) -> Resplit:
    """Where the stream goes on, from every old rank's loader state (in rank order), for the
    new shard list `urls`. `layout` describes the new layout and `changes` what differs, for
    the note."""
    old_urls = states[0].get("urls") or urls  # rank 0 stores the list; older states: assume unchanged
    epoch = max(int(s["epoch"]) for s in states)
    generation = max(int(s.get("generation", 0)) for s in states) + 1
    was = f"{states[0]['world_size']} rank(s) x {states[0]['num_workers']} worker(s)"
    head = f"data stream re-split for {layout} (was {was}; changed: {', '.join(changes)})"
    if resampled or states[0].get("resampled", True):
        buffered = sum(len((ws.get("buffer") or {}).get("entries", []))
                       for s in states for ws in s["workers"].values())
        return Resplit(epoch, generation, None,
                       f"{head}: shards are drawn with replacement, the draws go on from new seeds "
                       f"(re-split {generation}); {buffered} buffered samples dropped")
    started: set[str] = set()
    buffered, partial = 0, []
    for state in states:
        mine, waiting, cut = _started(state, old_urls, epoch)
        started |= mine
        buffered += waiting
        partial += cut
    skip = {i for i, u in enumerate(urls) if u in started}
    note = (f"{head}: epoch {epoch} goes on with the {len(urls) - len(skip)} of {len(urls)} shards no old "
            f"worker had started; dropped for this epoch: {buffered} samples waiting in shuffle buffers and "
            f"the unread rest of {len(partial)} partly read shard(s){_named(partial)}; no sample is read twice "
            f"this epoch")
    return Resplit(epoch, generation, skip or None, note)


def _named(urls: list[str], most: int = 3) -> str:
    if not urls:
        return ""
    more = f", ... ({len(urls) - most} more)" if len(urls) > most else ""
    return " (" + ", ".join(urls[:most]) + more + ")"
