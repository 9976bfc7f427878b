"""Periodic evaluation of an SR stage through the cascade: its low-res input drawn by the earlier stages.

With `evaluation.cascade_from` (the earlier stages' exports or checkpoints, in cascade order from
base64, each with its own sampler settings), an SR stage's periodic evaluation also lifts what
those stages draw for the same captions or prompts, as the cascade will at inference, instead of
only the ground-truth low-res images of the eval shards (periodic.py logs both, under distinct
keys).

The earlier stages do not change while this stage trains, and their noise is seeded, so what they
draw is the same at every evaluation. It is drawn once, at the first evaluation, for every row any
evaluation of the run will need (the grid and the FID/CLIP samples together): each earlier stage
is loaded once, in the sampling dtype (the dtype of the EMA network the evaluation samples with),
run over its share of the rows on each rank, and released before the next is loaded. Later
evaluations pay only for the stage under training. What stays in memory is the drawn low-res
images, N x 3 x r x r float32 on the CPU of every rank (r = the stage's input size: 16 grid images
at 256 px are 12.6 MB; 1,000 FID samples at 256 px, 786 MB).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from imagen_train.artifacts import stage_config
from imagen_train.config import Config, ConfigError
from imagen_train.stages import STAGE_NAMES, get_stage
from imagen_train.utils import dist

from .cascade import Precision, draw_stage


def _precision(device: torch.device, dtype: torch.dtype) -> Precision:
    """The cascade's `Precision` with weights in `dtype` (the periodic evaluation's sampling dtype)."""
    precision = Precision(32, device)
    precision.weight_dtype = dtype  # bf16 on a GPU that has it: Precision's mode 16 would pick fp16
    return precision


class CascadeConditioning:
    """Low-res inputs for an SR stage's evaluation, drawn by the earlier stages of the cascade."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sources = cfg.evaluation.cascade_from
        earlier = STAGE_NAMES[:STAGE_NAMES.index(cfg.stage)]
        if not get_stage(cfg.stage).is_super_resolution or len(self.sources) != len(earlier):
            raise ConfigError("evaluation.cascade_from", f"one entry per earlier stage of {cfg.stage}: "
                              f"{list(earlier)}", [s.path for s in self.sources])
        # Fail at start-up, not at the first evaluation: every path must hold the right stage.
        for i, (source, stage) in enumerate(zip(self.sources, earlier)):
            key = f"evaluation.cascade_from[{i}].path"
            try:
                source_cfg = stage_config(source.path)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(key, f"an export or checkpoint of stage {stage}", f"{source.path} ({err})") from None
            if source_cfg.stage != stage:
                raise ConfigError(key, f"an export or checkpoint of stage {stage}",
                                  f"{source.path} (stage {source_cfg.stage})")
            if source_cfg.text.embed_dim != cfg.text.embed_dim:
                raise ConfigError(key, f"a stage with text.embed_dim {cfg.text.embed_dim}, as this one",
                                  f"{source.path} (text.embed_dim {source_cfg.text.embed_dim})")
        self.input_resolution = get_stage(cfg.stage).input_resolution
        self._drawn: dict[str, Tensor] = {}

    def prepare(self, sets: dict[str, dict[str, Any]], device: torch.device, dtype: torch.dtype) -> None:
        """Draw the low-res images of every set (name -> {"text_emb", "text_mask", ...}) not drawn yet,
        all sets in one pass, so each earlier stage is loaded once (on every rank: collectives)."""
        todo = {name: cond for name, cond in sets.items() if name not in self._drawn}
        if not todo:
            return
        emb = torch.cat([cond["text_emb"] for cond in todo.values()])       # (N, L, D)
        mask = torch.cat([cond["text_mask"] for cond in todo.values()])     # (N, L)
        drawn = self._draw(emb, mask, device, dtype)                        # (N, 3, r, r)
        start = 0
        for name, cond in todo.items():
            n = cond["text_emb"].shape[0]
            self._drawn[name] = drawn[start:start + n]
            start += n

    def lift(self, name: str, cond: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """`cond` with "lowres" replaced by the earlier stages' samples of its rows (drawn once per name)."""
        self.prepare({name: cond}, device, dtype)
        lowres = self._drawn[name]
        if lowres.shape[0] != cond["text_emb"].shape[0]:
            raise ValueError(f"cascade set {name!r} was drawn for {lowres.shape[0]} rows, asked for "
                             f"{cond['text_emb'].shape[0]}")
        return {**cond, "lowres": lowres}

    def _draw(self, emb: Tensor, mask: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Each earlier stage over this rank's rows (rank::world), gathered back into row order."""
        rank, world = dist.rank(), dist.world_size()
        mine = list(range(rank, emb.shape[0], world))
        precision = _precision(device, dtype)
        images: Optional[Tensor] = None
        for index, source in enumerate(self.sources):
            # Its own noise per stage and rank, fixed by evaluation.seed (the same at every run).
            generator = torch.Generator(device=device).manual_seed(
                self.cfg.evaluation.seed * 7919 + index * 104729 + rank + 1)
            images, stats, _ = draw_stage(source.path, source.sampler, emb[mine], mask[mine], device, precision,
                                       images, generator, self.cfg.evaluation.batch_size)
            dist.print0(f"[eval] cascade: {stats.stage} drew {stats.num_images} images per rank at "
                        f"{stats.resolution} px in {stats.time_s:.1f} s")
        assert images is not None and images.shape[-1] == self.input_resolution
        gathered = dist.all_gather_tensor(images.to(device)).cpu()        # rank-major
        order = [i for r in range(world) for i in range(r, emb.shape[0], world)]
        return gathered[torch.argsort(torch.tensor(order))]


__all__ = ["CascadeConditioning"]
