"""The per-stage training loader: sharded tar streams -> batches, resumable exactly.

The sample stream of every (rank, worker) is a pure function of
(seed, rank, world_size, num_workers): a seeded shard sequence (drawn with replacement when
`data.resampled`, else a permutation per epoch), a seeded shuffle buffer, and a per-sample RNG
keyed by the sample's position for random crops. Each worker forms whole batches itself and
tags them with its state after that batch: the shard counter and position in the shard it is
reading, and the (shard, index) tags of the samples in its shuffle buffer (data/stream.py). The
main process keeps the state of the last batch it *handed out* per worker, so prefetched
batches never count. On `load_state_dict` every worker opens its current shard directly,
re-reads (without decoding) only the samples its buffer held and the read part of the current
shard, and the DataLoader's round-robin is rotated to start with the worker that was next.
Result: 10 steps + save + new process + load + 10 steps yields the same batches as 20 steps
straight, and what a resume reads does not grow with the step (docs/training.md, "Resume").
A state saved under another layout (ranks, workers, shuffle buffer, shard list, seed) is not
continued exactly but re-split over this one (`resplit`, data/resplit.py).

Ranks and workers never share samples: with at least ranks x workers shards each worker owns
the shards `urls[g::ranks*workers]` (g = rank * workers + worker); with fewer, every worker
reads all shards and keeps every (ranks x workers)-th sample, at extra I/O cost.

We drive webdataset's URL handling (`expand_urls`, `gopen`) but not its pipeline stages: exact
resume needs to own the shard order, shuffle buffer and position, which `wds.WebDataset` does
not expose.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagen_train.data.resplit import mask_to_set, plan_resplit, set_to_mask
from imagen_train.data.samples import Batch, Sample, SampleSpec, collate, decode
from imagen_train.data.shards import expand_shards, iter_raw_samples
from imagen_train.data.stream import ShuffleBuffer, TailReader, epoch_order, seeded_rng, shard_split
from imagen_train.data.transforms import SkipSample
from imagen_train.utils.signals import worker_init

log = logging.getLogger(__name__)
MAX_SKIP_EXAMPLES = 20  # named skipped samples kept per worker (counts are complete)
STATE_VERSION = 2  # 2: shard counter, tail position and buffer tags (1: a sample count to replay)


def _fresh_worker_state() -> dict[str, Any]:
    return {"epoch": 0, "consumed": 0, "done": False, "reader": {}, "buffer": None,
            "stats": {"samples": 0, "skipped": {}, "examples": [], "reread_samples": 0, "reread_bytes": 0}}


class StageStream(IterableDataset):
    """Batches of one stage for one rank; each DataLoader worker yields its own batches.

    `skip`: indices of `data.train_shards` left out of this epoch (those a re-split found
    started by the layout before it); `generation`: how many re-splits the stream has been through.
    """

    def __init__(self, cfg: Any, rank: int, world_size: int, worker_states: dict[int, dict[str, Any]],
                 rotation: int = 0, generation: int = 0, skip: Optional[set[int]] = None):
        super().__init__()
        if not cfg.data.train_shards:
            raise ValueError("config key 'data.train_shards' is not set: name the training shards")
        self.all_urls = expand_shards(cfg.data.train_shards)
        self.urls = [u for i, u in enumerate(self.all_urls) if i not in skip] if skip else self.all_urls
        self.generation = generation
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_workers = max(1, cfg.data.num_workers)
        self.spec = SampleSpec.from_config(cfg)
        self.batch_size = cfg.training.micro_batch_size
        self.worker_states = worker_states
        self.rotation = rotation

    def _ids(self, worker: int) -> tuple[int, ...]:
        tail = (self.generation,) if self.generation else ()
        return (self.cfg.data.seed, self.rank, self.world_size, self.num_workers, worker, *tail)

    def _shard_sequence(self, worker: int, epoch: int
                        ) -> tuple[Callable[[int], Optional[str]], Optional[tuple[int, int]]]:
        """(shard URL by shard counter k, (index, stride) of the sample-level split or None).

        See `shard_split`. Each resampled draw is seeded by k itself, so shard k needs no replay
        of draws 0..k-1.
        """
        own, split, key = shard_split(self.urls, self.cfg.data.seed, self.rank, self.world_size,
                                      self.num_workers, worker, epoch, self.generation)
        if self.cfg.data.resampled:
            return (lambda k: own[seeded_rng(*key, k).randrange(len(own))]), split
        order = epoch_order(own, key)
        return (lambda k: order[k] if k < len(order) else None), split

    def _reader(self, worker: int, epoch: int, state: dict[str, Any], stats: dict[str, Any]) -> TailReader:
        shard_url, split = self._shard_sequence(worker, epoch)

        def on_error(url: str, key: str, msg: str) -> None:
            _skip(stats, "bad_shard", f"{url}:{key}" if key else url, msg)

        def read(url: str) -> Iterator[dict[str, Any]]:
            return iter_raw_samples(url, on_error, keep=self.spec.keep,
                                    retries=self.cfg.data.read_retries, backoff_s=self.cfg.data.retry_backoff_s,
                                    timeout_s=self.cfg.data.read_timeout_s)

        def on_empty(in_a_row: int) -> None:
            if self.cfg.data.resampled and in_a_row >= 100 * max(1, len(self.urls)):
                raise RuntimeError(f"no readable samples in shards {self.cfg.data.train_shards}")

        return TailReader(shard_url, read, split, state, on_empty)

    def _samples(self, worker: int, state: dict[str, Any], snapshot: list[Callable[[], None]]
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(output position, raw sample) after the shuffle, from the saved position on.

        `snapshot[0]()`, called between two samples, writes the reader's position and the
        buffer's tags into `state` (O(buffer) work, so only once a batch).
        """
        epoch, stats = state["epoch"], state["stats"]
        reader = self._reader(worker, epoch, state["reader"], stats)
        buffer = ShuffleBuffer(self.cfg.data.shuffle_buffer, (3, *self._ids(worker), epoch))
        if state["buffer"] is not None:  # resume: re-read only what the buffer held
            saved = state["buffer"]
            missing = buffer.restore(saved, reader.refetch([(k, j) for _, k, j in saved["entries"]]))
            if missing:
                _skip(stats, "resume_lost", f"{missing} shuffle-buffer sample(s)", "could not be re-read")
        stats["reread_samples"] = stats.get("reread_samples", 0) + reader.reread["samples"]
        stats["reread_bytes"] = stats.get("reread_bytes", 0) + reader.reread["bytes"]

        def save() -> None:
            state["reader"], state["buffer"] = reader.state_dict(), buffer.state_dict()

        snapshot.append(save)
        for tag, raw in reader:
            out = buffer.push(tag, raw)
            if out is not None:
                yield buffer.outputs - 1, out[1]
        for _, raw in buffer.drain():
            yield buffer.outputs - 1, raw

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        worker = (slot + self.rotation) % self.num_workers
        state = copy.deepcopy(self.worker_states.get(worker) or _fresh_worker_state())
        if state["done"]:
            return
        ids, epoch = self._ids(worker), state["epoch"]
        stats = state["stats"]
        batch: list[Sample] = []
        snapshot: list[Callable[[], None]] = []
        for pos, raw in self._samples(worker, state, snapshot):
            try:
                sample = decode(raw, self.spec, seeded_rng(4, *ids, epoch, pos))
            except SkipSample as err:
                _skip(stats, err.reason, f"{raw['__url__']}:{raw['__key__']}", err.detail)
                continue
            stats["samples"] += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                state["consumed"] = pos + 1
                snapshot[0]()
                out = collate(batch, self.cfg.text.max_length, self.cfg.text.pad_to_longest)
                out["_state"] = {"worker": worker, **copy.deepcopy(state)}
                yield out
                batch = []
        # A finite epoch ends here; the partial batch is dropped so every batch is full.
        state["done"] = True
        yield {"_end": True, "_state": {"worker": worker, **copy.deepcopy(state)}}


def _skip(stats: dict[str, Any], reason: str, name: str, detail: str) -> None:
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
    stats["examples"] = (stats["examples"] + [f"{reason}: {name} {detail}".strip()])[-MAX_SKIP_EXAMPLES:]


class TrainLoader:
    """Endless (resampled) or per-epoch iterable of batches with exact `state_dict` resume.

    `iter(loader)` returns the loader itself, so `next(iter(loader))` continues the stream;
    one DataLoader iterator (and its workers) lives until the epoch ends or a state is loaded.
    """

    def __init__(self, cfg: Any, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_workers = max(1, cfg.data.num_workers)
        self.epoch = 0
        self.batches = 0          # batches handed out since the start of training
        self.next_worker = 0
        self.worker_states: dict[int, dict[str, Any]] = {}
        self.generation = 0       # re-splits onto another layout so far (data/resplit.py)
        self.skip: Optional[set[int]] = None  # shards a re-split left out of this epoch
        self._it: Optional[Iterator[dict[str, Any]]] = None
        self.urls = StageStream(cfg, rank, world_size, {}).all_urls  # fail now on a bad shard spec

    # Iteration ------------------------------------------------------------------------------
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._it = self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                self._close()
                self.epoch += 1  # a finite epoch is over; the next iteration starts the next one
                self.skip = None
                self.worker_states = {w: {**_fresh_worker_state(), "epoch": self.epoch,
                                          "stats": s["stats"]} for w, s in self.worker_states.items()}
                self.next_worker = 0
                raise
            state = batch.pop("_state")
            worker = state.pop("worker")
            self.worker_states[worker] = state
            if batch.get("_end"):
                continue
            self.next_worker = (worker + 1) % self.num_workers
            self.batches += 1
            return batch

    def _start(self) -> Iterator[dict[str, Any]]:
        states = {w: s for w, s in self.worker_states.items()}
        for w in range(self.num_workers):
            states.setdefault(w, {**_fresh_worker_state(), "epoch": self.epoch})
        dataset = StageStream(self.cfg, self.rank, self.world_size, states, rotation=self.next_worker,
                              generation=self.generation, skip=self.skip)
        if self.cfg.data.num_workers == 0:
            return iter(dataset)
        # Workers ignore stop signals: the rank saves, exits and then stops them. The generator:
        # starting workers draws their base seed from it, not from the global torch RNG, whose
        # state a checkpoint restores (the draw shifted the noise after a resume; our samples
        # are seeded by the stream state, not by that seed).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.data.num_workers,
                            worker_init_fn=worker_init(self.cfg.training.stop_signals),
                            generator=torch.Generator(),
                            prefetch_factor=self.cfg.data.prefetch_factor,
                            pin_memory=self.cfg.data.pin_memory and torch.cuda.is_available())
        return iter(loader)

    def _close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._close()

    # Counters -------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Samples delivered and skipped (by reason, with recent examples), over all workers."""
        total: dict[str, Any] = {"samples": 0, "skipped": {}, "examples": [], "batches": self.batches,
                                 "reread_samples": 0, "reread_bytes": 0}
        for w in sorted(self.worker_states):
            s = self.worker_states[w]["stats"]
            total["samples"] += s["samples"]
            total["reread_samples"] += s.get("reread_samples", 0)
            total["reread_bytes"] += s.get("reread_bytes", 0)
            for reason, n in s["skipped"].items():
                total["skipped"][reason] = total["skipped"].get(reason, 0) + n
            total["examples"].extend(s["examples"])
        total["num_skipped"] = sum(total["skipped"].values())
        return total

    # Resume ---------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"seed": self.cfg.data.seed, "world_size": self.world_size, "num_workers": self.num_workers,
                "resampled": self.cfg.data.resampled, "shuffle_buffer": self.cfg.data.shuffle_buffer,
                "shards": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]}

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream after the last batch handed out (plain Python, JSON-safe)."""
        state = {"version": STATE_VERSION, "rank": self.rank, **self._layout(), "num_shards": len(self.urls),
                 "epoch": self.epoch, "batches": self.batches, "next_worker": self.next_worker,
                 "generation": self.generation, "skip": set_to_mask(self.skip),
                 "workers": {str(w): copy.deepcopy(s) for w, s in self.worker_states.items()}}
        if self.rank == 0:  # for a re-split after data.train_shards changed (data/resplit.py)
            state["urls"] = list(self.urls)
        return state

    def changes(self, state: dict[str, Any]) -> list[str]:
        """What differs between the layout a state was saved with and this loader's, by config
        key ('data.num_workers 0 -> 2'); empty when `load_state_dict` continues it exactly.
        States written before a key was recorded are taken to match on it."""
        names = {"seed": "data.seed", "world_size": "ranks", "num_workers": "data.num_workers",
                 "resampled": "data.resampled", "shuffle_buffer": "data.shuffle_buffer",
                 "shards": "data.train_shards"}
        return [f"{names[k]} {state[k]} -> {v}" if k != "shards" else "data.train_shards (another shard list)"
                for k, v in self._layout().items() if k in state and state[k] != v]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the saved position; the layout must match (else `resplit`)."""
        self._close()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} cannot be continued by this "
                             f"loader (version {STATE_VERSION}: the shard sequence and buffer state changed)")
        changes = self.changes(state) + ([f"rank {state['rank']} -> {self.rank}"] if state["rank"] != self.rank else [])
        if changes:
            raise ValueError(f"loader state was saved with another layout ({', '.join(changes)}): exact resume "
                             f"is impossible; `resplit` continues it re-split over this layout")
        self.batches = int(state["batches"])
        self.epoch = int(state["epoch"])
        self.next_worker = int(state["next_worker"])
        self.generation = int(state.get("generation", 0))
        self.skip = mask_to_set(state.get("skip")) or None
        self.worker_states = {int(w): copy.deepcopy(s) for w, s in state["workers"].items()}

    def resplit(self, states: list[dict[str, Any]]) -> str:
        """Continue the stream that every old rank's state (in rank order) describes, re-split
        over this loader's layout; returns what changed and what it cost (data/resplit.py)."""
        self._close()
        for state in states:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {state.get('version')!r} cannot be re-split by this "
                                 f"loader (version {STATE_VERSION})")
        layout = f"{self.world_size} rank(s) x {self.num_workers} worker(s)"
        plan = plan_resplit(states, self.urls, self.cfg.data.resampled, layout, self.changes(states[0]))
        self.epoch, self.generation, self.skip = plan.epoch, plan.generation, plan.skip
        self.batches = max(int(s["batches"]) for s in states)
        self.worker_states, self.next_worker = {}, 0
        log.info("%s", plan.note)
        return plan.note


def build_train_loader(cfg: Any, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training loader of `cfg.stage` for one rank (see docs/CONTRACTS.md)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return TrainLoader(cfg, rank, world_size)
