"""Resuming a checkpoint: which one, and loading it exactly on the layout that wrote it or
re-sliced onto another one.

Which (`candidates`, then `first_intact`): `--resume auto` tries `latest`, then the other
complete folders, newest first, skipping (with the reason) any whose files do not have their
manifest sizes; the first whose checksums verify (the work split over the ranks) is resumed. A
given folder must verify; `none` starts over.

Same world size and ZeRO stage (the common case): DeepSpeed loads its own files, every rank its
own state, and the run goes on bit for bit as if never stopped. Another world size or ZeRO stage
(a requeued job on more or fewer nodes): the fp32 masters, Adam's moments and step, the LR
schedule and DeepSpeed's step counters are re-sliced from the old ranks' files
(`Engine.load_resharded`: training/engine_reshard.py), the EMA is re-cut
(`artifacts.ema_slices_for`), and the data stream is re-split over the new ranks and workers
(`data/resplit.py`); the same re-split follows
a change of `data.num_workers`, `data.shuffle_buffer` or `data.train_shards`. Rank 0 logs one
notice of what changed and what exactness it cost (docs/training.md, "Resume").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from imagen_train import artifacts
from imagen_train.artifacts.checkpoints import pickled_bytes, rank_state_path
from imagen_train.config import Config
from imagen_train.training import checkpoint as ckpt
from imagen_train.training.ema import EMA
from imagen_train.training.engine_api import Engine
from imagen_train.utils import dist
from imagen_train.utils.rng import set_rng_state


@dataclass
class ResumePlan:
    folder: Path
    stage: str
    saved_world: int
    saved_zero: int
    world_size: int
    zero_stage: int
    precision: str

    @property
    def reshard(self) -> bool:
        """Whether the optimizer state must be re-sliced (another world size or ZeRO stage)."""
        return (self.saved_world, self.saved_zero) != (self.world_size, self.zero_stage)

    def changes(self) -> list[str]:
        out = [f"ranks {self.saved_world} -> {self.world_size}"] if self.saved_world != self.world_size else []
        return out + ([f"ZeRO stage {self.saved_zero} -> {self.zero_stage}"] if self.saved_zero != self.zero_stage else [])


def candidates(resume: str, cfg: Config, root: Path) -> list[Path]:
    """Checkpoints to try for `--resume` ('auto', 'none' or a folder), most preferred first, whose
    files all have their manifest sizes; refuses (CheckpointError) a first candidate of another
    stage or network, or one that cannot be re-sliced for this layout, before any process group
    exists (file sizes only: the checksums are split over the ranks later, `first_intact`)."""
    if resume == "none":
        return []
    if resume != "auto":
        artifacts.verify(Path(resume), checksums=False)
        found = [Path(resume)]
    else:
        found = []
        for tag in artifacts.resume_candidates(root):
            try:
                artifacts.verify(root / tag, checksums=False)
                found.append(root / tag)
            except ckpt.CheckpointError as err:
                dist.print0(f"[checkpoint] skipping {tag}: {err}")
        if not found:
            dist.print0(f"[train] no checkpoint in {root}: starting from scratch")
    if found:
        plan(found[0], cfg, dist.world_size())
        artifacts.refuse_other_model(found[0], cfg)  # names every setting that differs
    return found


def first_intact(found: list[Path], explicit: bool, root: Path) -> Optional[Path]:
    """The first of `found` whose checksums verify (work split over the ranks; call on every
    rank), or None; an `explicit` (--resume FOLDER) one that fails raises."""
    for folder in found:
        error = ckpt.verify_shared(folder)
        if error is None:
            return folder
        if explicit:
            raise ckpt.CheckpointError(error)
        dist.print0(f"[checkpoint] skipping {folder.name}: {error}")
    if found:
        dist.print0(f"[train] no intact checkpoint in {root}: starting from scratch")
    return None


def plan(folder: Path, cfg: Config, world_size: int) -> ResumePlan:
    """How `folder` will be resumed; refuses (CheckpointError) what cannot be, before anything loads."""
    t = cfg.training
    source = artifacts.check_resume_target(folder, cfg.stage, world_size, t.zero_stage, t.offload_optimizer)
    saved_world = world_size if source["world_size"] is None else int(source["world_size"])
    saved_zero = t.zero_stage if source["zero_stage"] is None else int(source["zero_stage"])
    return ResumePlan(folder, cfg.stage, saved_world, saved_zero, world_size, t.zero_stage, t.precision)


def restore(plan: ResumePlan, engine: Engine, ema: EMA, loader: Any, layout: dict[str, dict]) -> dict[str, Any]:
    """Load the checkpoint into the engine, the EMA and the loader and set the RNG states; call on
    every rank. Returns the rank state the counters come from (step, bad_steps, wandb_id)."""
    folder = plan.folder
    states: Optional[list[dict]] = None
    read = None
    if plan.reshard:
        states = artifacts.read_all_rank_states(folder, mmap=True)
        state = states[dist.rank() % len(states)]
        read = engine.load_resharded(folder, [s["optimizer_layout"] for s in states])
        # and what the EMA and every old rank's state file cost (their tensors memory-mapped):
        read["tensor_bytes"] += 4 * sum(e["end"] - e["start"] for e in layout.values())
        read["metadata_bytes"] += sum(pickled_bytes(rank_state_path(folder, r)) for r in range(len(states)))
        read["files"] += len(states)
    else:
        state = ckpt.load_rank_state(folder)
        engine.load(folder)
    artifacts.refuse_other_run(folder, state["stage"], plan.stage)
    if state.get("layout") != layout:  # other bounds: another layout, or an EMA cut in equal parts
        state["ema"]["shadow"] = artifacts.ema_slices_for(folder, layout, states)
    ema.load_state_dict(state["ema"])
    data_note = None
    if loader.changes(state["data"]):  # another world size, or data keys (a ZeRO stage alone: exact)
        states = states or artifacts.read_all_rank_states(folder, mmap=True)
        data_note = loader.resplit([s["data"] for s in states])
    else:
        loader.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    if plan.reshard or data_note:
        reads = dist.all_gather_object(read)
        dist.print0(notice(plan, reads if plan.reshard else None, data_note))
    return state


def ranks(n: int) -> str:
    return f"{n} rank" + ("" if n == 1 else "s")


def notice(plan: ResumePlan, reads: Optional[list[dict[str, int]]], data_note: Optional[str]) -> str:
    """The one log line of a resume onto another layout: what changed, what was kept, what was lost."""
    parts = [f"[train] resuming {plan.folder.name} (written by {ranks(plan.saved_world)} at ZeRO stage "
             f"{plan.saved_zero}) on {ranks(plan.world_size)} at ZeRO stage {plan.zero_stage}"]
    if reads is not None:
        tensor_mib = max(r["tensor_bytes"] for r in reads) / 2**20
        meta_kib = max(r["metadata_bytes"] for r in reads) / 2**10
        parts.append(f"re-sliced ({', '.join(plan.changes())}): the fp32 masters, Adam's moments and step, the "
                     f"EMA, the step and the LR schedule are the checkpoint's; each rank read at most "
                     f"{tensor_mib:.1f} MiB of tensors (optimizer state and EMA) and {meta_kib:.0f} KiB of pickled "
                     f"metadata from {max(r['files'] for r in reads)} files")
        if plan.precision == "fp16":
            parts.append("fp16's dynamic loss scale starts again from its initial value")
    if data_note:
        parts.append(data_note)
        parts.append("the batches are no longer the old layout's (the diffusion noise of each global micro "
                     "batch still is: seeded by step and batch index)")
    else:
        parts.append("the batches are the old layout's; sums run in another order (fp32 rounding)")
    return "; ".join(parts)
