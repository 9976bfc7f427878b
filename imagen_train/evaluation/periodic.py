"""Periodic evaluation during training.

    trainer = Trainer(cfg, evaluator=make_periodic_evaluator(cfg))

The trainer calls the evaluator after every optimizer step, on every rank, with only what it
needs (never the Trainer): the step, `materialize_ema(dtype, device) -> nn.Module` (training's
callable that builds the EMA network; see `training.ema_network`), the device, a metric and an
image log function, and the folder for sample grids. The evaluator knows nothing of how ZeRO
slices the weights. Every `evaluation.eval_every_steps` optimizer steps, on every rank:
1. `materialize_ema` builds the EMA network in the sampling dtype (bf16 on a GPU, fp32 on a
   CPU): a collective in which each rank receives about one model's bytes in that dtype,
   whatever the world size, and no full fp32 copy is made; the network is freed after the
   evaluation;
2. a grid of samples is drawn and saved to <out_dir>/step_N.png (run_dir/samples) and logged;
3. when `evaluation.num_fid_samples` > 0 and the Inception (FID) and/or CLIP weights are
   configured, that many samples are drawn (split over the ranks, features gathered) and FID
   and CLIP score (plain cosine) are logged under eval/.
`eval/received_bytes` logs what this rank (rank 0) received from the others during the
evaluation (`utils.dist.received_bytes`); `eval/time_s` its duration.

Conditioning. Base stage with `text.encoder_path` set: the grid shows `evaluation.prompts`,
encoded once per run on rank 0 alone (on the training device, in the encoder's default dtype
there, as `data_tools precompute-embeddings` does; the encoder is freed right after) and kept
in <out_dir>/prompt_embeddings.pt, so a resumed run reads them back instead of loading T5
again; the other ranks receive the embeddings by broadcast and never load a text encoder.
Otherwise (no encoder, or an SR stage) the grid shows the first len(prompts) (4 if none)
samples of `data.eval_shards`, using their captions' precomputed embeddings and, for SR
stages, their ground-truth low-res images. FID/CLIP always condition on the first
`num_fid_samples` eval-shard samples; FID compares with those samples' images unless
`evaluation.fid_stats_path` names cached statistics.

Through the cascade. An SR stage with `evaluation.cascade_from` (the earlier stages' exports, each
with its sampler) also lifts what those stages draw for the prompts (or the eval captions), at its
output resolution: grid `cascade_step_N.png` logged as eval/cascade/samples, and FID / CLIP score
against whole eval images as eval/cascade/fid and eval/cascade/clip_score. The earlier stages
draw once per run (cascade_conditioning.py says what that costs).

The training run is unchanged by it: the torch/numpy/python (and CUDA) RNG states are saved
and restored around it, sampling draws from its own seeded generator, and the training loader
and engine are never touched (eval shards are read directly with the data layer).
"""

from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from imagen_train.config import Config, ConfigError
from imagen_train.data import SampleSpec, collate, read_samples
from imagen_train.diffusion import build_diffusion
from imagen_train.diffusion.caller import NetworkCaller, sampling_memory_format
from imagen_train.stages import get_stage
from imagen_train.text import load_text_encoder
from imagen_train.utils import dist
from imagen_train.utils.rng import preserved_rng

from .cascade import sample_in_batches
from .cascade_conditioning import CascadeConditioning
from .clip_score import CLIP_HOW_TO, ClipScorer
from .fid import FeatureStats, extract_features, fid_from_stats, require_fid_stats, to_uint8
from .grids import make_grid, save_png
from .inception import load_fid_inception
from .weights import require_file

DEFAULT_GRID_SAMPLES = 4
LogFn = Callable[[dict[str, float], int], None]
LogImageFn = Callable[..., None]  # log_image(key, path, step, caption="")
MaterializeFn = Callable[[torch.dtype, torch.device], torch.nn.Module]  # materialize_ema(dtype, device)
PROMPT_CACHE = "prompt_embeddings.pt"


def sampling_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it; fp32 elsewhere (bf16 convolutions are ~70x slower than fp32 on
    AVX2 CPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def free_memory() -> None:
    """Collect what the evaluation dropped and hand the CUDA cache back, so training gets it now."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_eval_samples(cfg: Config, n: int) -> dict[str, Any]:
    """The first `n` decodable samples of `data.eval_shards` (center crop; deterministic), collated
    as the loader collates (`data.samples`), with the text in float32.

    Returns {"image" (n, 3, T, T), ["lowres" (n, 3, t, t)], "text_emb" (n, L, D), "text_mask",
    "caption", "key"}, images in [-1, 1]. Fewer than n if the shards hold fewer.
    """
    if not cfg.data.eval_shards:
        raise ConfigError("data.eval_shards", "eval shards (periodic evaluation conditions on them)", None)
    rng = random.Random(cfg.evaluation.seed)  # sr1024's patch position; never the global RNG
    samples = read_samples(cfg.data.eval_shards, SampleSpec.from_config(cfg, random_crop=False), n, rng)
    if not samples:
        raise ConfigError("data.eval_shards", "shards with usable samples", cfg.data.eval_shards)
    out: dict[str, Any] = dict(collate(samples, cfg.text.max_length))
    out["text_emb"] = out["text_emb"].float()  # the sampler calls the network with what it is given
    return out


class EvaluationStopped(Exception):
    """`should_stop()` answered yes between two sampling batches (every rank alike)."""


def _never() -> bool:
    return False


def _take(batch: dict[str, Any], index: list[int]) -> dict[str, Any]:
    return {k: ([v[i] for i in index] if isinstance(v, list) else v[index]) for k, v in batch.items()}


class PeriodicEvaluator:
    """The callback object; see the module docstring."""

    def __init__(self, cfg: Config):
        self.cfg, self.ev = cfg, cfg.evaluation
        self.every = self.ev.eval_every_steps
        super_resolution = get_stage(cfg.stage).is_super_resolution
        self.use_prompts = not super_resolution and bool(cfg.text.encoder_path) and bool(self.ev.prompts)
        self.num_grid = (len(self.ev.prompts) or DEFAULT_GRID_SAMPLES) * self.ev.num_images_per_prompt
        self.fid_on = self.ev.num_fid_samples > 0 and bool(self.ev.inception_path)
        self.clip_on = self.ev.num_fid_samples > 0 and bool(self.ev.clip_path)
        # Fail at start-up, not after hours of training: weights that are named must exist, and
        # what the evaluation conditions on must be readable (MissingWeightsError, ConfigError).
        if self.fid_on:
            require_file(self.ev.inception_path, "evaluation.inception_path", "the FID Inception weights")
            if self.ev.fid_stats_path:
                # exists, our pipeline, and of the size this evaluation samples
                require_fid_stats(self.ev.fid_stats_path, "evaluation.fid_stats_path", cfg.train_resolution)
        if self.clip_on:
            require_file(self.ev.clip_path, "evaluation.clip_path", CLIP_HOW_TO, folder=True)
        if not self.use_prompts or self.fid_on or self.clip_on:
            if not cfg.data.eval_shards:
                raise ConfigError("data.eval_shards", "eval shards (evaluation conditions on their captions"
                                  + (" and low-res images" if super_resolution else "") + ")", None)
        if self.ev.num_fid_samples > 0 and not (self.fid_on or self.clip_on):
            dist.print0("[eval] evaluation.num_fid_samples > 0 but neither evaluation.inception_path nor "
                        "evaluation.clip_path is set: sample grids only")
        self._grid_cond: Optional[dict[str, Any]] = None
        self._metric_cond: Optional[dict[str, Any]] = None
        self._inception = self._clip = None
        self._real_stats: dict[str, FeatureStats] = {}
        self._should_stop: Callable[[], bool] = _never
        # SR stages with evaluation.cascade_from: also lift the earlier stages' samples.
        self.cascade = CascadeConditioning(cfg) if self.ev.cascade_from else None
        self._cascade_rows: Optional[dict[str, Any]] = None

    def due(self, step: int) -> bool:
        """Whether `step` is an evaluation step."""
        if self.every <= 0 or step % self.every:
            return False
        return self.ev.at_last_step or step != self.cfg.training.max_steps

    # ------------------------------------------------------------------------------------------
    def __call__(self, *, step: int, materialize_ema: MaterializeFn, device: torch.device, log: LogFn,
                 log_image: LogImageFn, out_dir: Path, should_stop: Callable[[], bool] = _never) -> None:
        """Evaluate when `step` is due (on every rank: it enters collectives).

        `materialize_ema(dtype, device)` returns the EMA network (called on every rank at once,
        only when a step is due); `log(metrics, step)` and `log_image(key, path, step,
        caption=)` record results; grids go to `out_dir`. `should_stop()` is asked before every
        sampling batch, on every rank (a collective answer: the trainer's agreed stop request);
        yes ends the evaluation there, unlogged.
        """
        if not self.due(step):
            return
        self._should_stop, stopped = should_stop, None
        try:
            with preserved_rng(), torch.no_grad():
                self.evaluate(step, materialize_ema, device, log, log_image, Path(out_dir))
        except EvaluationStopped as err:
            stopped = str(err)
        finally:
            self._should_stop = _never
        if stopped is not None:  # out of the except block: its traceback held the EMA network
            free_memory()
            dist.print0(f"[eval] step {step}: {stopped}; the evaluation is not logged")

    def _prompt_embeddings(self, device: torch.device, out_dir: Path) -> tuple[Tensor, Tensor]:
        """`evaluation.prompts` encoded on rank 0 only (or read from its cache file) and
        broadcast: (emb (P, L, D) float32, mask (P, L) bool) on every rank, on the CPU."""
        emb = mask = None
        error = None
        if dist.is_main():
            try:
                emb, mask = self._encode_or_read(device, out_dir / PROMPT_CACHE)
            except Exception as err:  # the other ranks wait in the broadcast below: tell them
                error = err
        message = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 could not encode evaluation.prompts: {message}")
        emb = dist.broadcast_tensor(emb, device=device).cpu().float()
        mask = dist.broadcast_tensor(mask, device=device).cpu()
        return emb, mask

    def _encode_or_read(self, device: torch.device, cache: Path) -> tuple[Tensor, Tensor]:
        """The prompts' embeddings from `cache` when it holds these prompts of this encoder, else
        from the encoder (loaded on `device`, then freed), written to `cache` for a resumed run."""
        key = {"prompts": list(self.ev.prompts), "encoder_path": str(self.cfg.text.encoder_path),
               "max_length": int(self.cfg.text.max_length)}
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if {k: stored.get(k) for k in key} == key:
                return stored["emb"], stored["mask"]
        enc = load_text_encoder(self.cfg.text.encoder_path, device, None, self.cfg.text.max_length)
        emb, mask = enc.encode(self.ev.prompts, pad_to_max_length=True)
        emb, mask = emb.cpu(), mask.cpu()
        del enc
        free_memory()
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        torch.save({**key, "emb": emb, "mask": mask}, partial)
        os.replace(partial, cache)  # never a half-written cache, even if killed here
        return emb, mask

    def _prompt_rows(self, device: torch.device, out_dir: Path) -> dict[str, Any]:
        """`evaluation.prompts` (`_prompt_embeddings`), each num_images_per_prompt times."""
        emb, mask = self._prompt_embeddings(device, out_dir)
        k = self.ev.num_images_per_prompt
        return {"text_emb": emb.float().repeat_interleave(k, 0), "text_mask": mask.repeat_interleave(k, 0),
                "caption": [p for p in self.ev.prompts for _ in range(k)]}

    def _grid_conditioning(self, device: torch.device, out_dir: Path) -> dict[str, Any]:
        if self._grid_cond is None:
            if self.use_prompts:
                self._grid_cond = self._prompt_rows(device, out_dir)
            else:
                n = len(self.ev.prompts) or DEFAULT_GRID_SAMPLES
                k = self.ev.num_images_per_prompt
                batch = read_eval_samples(self.cfg, n)
                index = [i for i in range(len(batch["caption"])) for _ in range(k)]
                self._grid_cond = _take(batch, index)
        return self._grid_cond

    def _sample(self, net, cond: dict[str, Any], seed: int, device: torch.device, gather: bool = True,
                resolution: Optional[int] = None) -> Tensor:
        """Samples for this rank's share (rows rank::world) of `cond`, `resolution` px (default
        train_resolution: T).

        Returns this rank's (rows, 3, T, T) on the CPU, or with `gather` every rank's (N, 3, T, T)
        on every rank, ordered by rank then row (see `_order`).
        """
        diffusion = build_diffusion(self.cfg.diffusion)
        rank, world = dist.rank(), dist.world_size()
        mine = list(range(rank, len(cond["caption"]), world))
        part = _take(cond, mine)
        res = resolution or self.cfg.train_resolution
        gen = torch.Generator(device=device).manual_seed(self.ev.seed * 7919 + seed * 104729 + rank)
        caller = NetworkCaller(net, memory_format=sampling_memory_format(device))  # in the EMA network's dtype

        def stop_check(batch: int) -> None:
            if self._should_stop():
                raise EvaluationStopped(f"a stop was requested after {batch} sampling batches")

        # As many batches on every rank (rank 0 has the most rows), so the stop question, a
        # collective, is asked the same number of times everywhere.
        most_rows = -(-len(cond["caption"]) // world)
        local, _, _, _ = sample_in_batches(diffusion, caller, self.ev.sampler, res, part["text_emb"], part["text_mask"],
                                           part.get("lowres"), self.ev.batch_size, gen, device,
                                           before_batch=stop_check, num_batches=-(-most_rows // self.ev.batch_size))
        return dist.all_gather_tensor(local.to(device)).cpu() if gather else local

    @staticmethod
    def _order(n: int) -> list[int]:
        """Row indices of `cond` in the order `_sample` returns them (rank-major)."""
        world = dist.world_size()
        return [i for r in range(world) for i in range(r, n, world)]

    def evaluate(self, step: int, materialize_ema: MaterializeFn, device: torch.device, log: LogFn,
                 log_image: LogImageFn, out_dir: Path) -> None:
        """Build the EMA network, draw the grid (and metrics), log them, free the network."""
        start, received = time.perf_counter(), dist.received_bytes()
        net = materialize_ema(sampling_dtype(device), device).eval().requires_grad_(False)
        cond = self._grid_conditioning(device, out_dir)
        images = self._sample(net, cond, seed=0, device=device)
        order = self._order(len(cond["caption"]))
        images = images[torch.argsort(torch.tensor(order))]  # back to prompt order
        path = out_dir / f"step_{step}.png"
        metrics: dict[str, float] = {}
        if dist.is_main():
            k = self.ev.num_images_per_prompt
            save_png(make_grid(images, ncols=k if k > 1 else None), path)  # a row per prompt
            log_image("eval/samples", path, step, caption=" | ".join(dict.fromkeys(cond["caption"])))
        if self.fid_on or self.clip_on:
            if self._metric_cond is None:
                self._metric_cond = read_eval_samples(self.cfg, self.ev.num_fid_samples)
            metrics.update(self._metrics(net, device, self._metric_cond, "eval/"))
        if self.cascade is not None:
            metrics.update(self._evaluate_cascade(net, step, device, log_image, out_dir))
        del net  # the only reference: its storage goes here
        free_memory()
        metrics["eval/time_s"] = time.perf_counter() - start
        metrics["eval/received_bytes"] = float(dist.received_bytes() - received)
        log(metrics, step)
        dist.print0(f"[eval] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    + f"; grid {path}")
        dist.barrier()

    def _evaluate_cascade(self, net, step: int, device: torch.device, log_image: LogImageFn,
                          out_dir: Path) -> dict[str, float]:
        """The grid (and FID/CLIP) of the stage lifting the earlier stages' samples, at its output
        resolution (cascade_conditioning.py), logged under eval/cascade/."""
        assert self.cascade is not None
        dtype = next(net.parameters()).dtype
        sets = {"grid": self._cascade_grid_rows(device, out_dir)}
        if self.fid_on or self.clip_on:
            # Whole images at the output resolution: what the cascade's samples are compared with.
            full = replace(self.cfg, train_resolution=self.cfg.output_resolution)
            sets["metrics"] = read_eval_samples(full, self.ev.num_fid_samples)
        self.cascade.prepare(sets, device, dtype)  # once per run: each earlier stage loaded once
        cond = self.cascade.lift("grid", sets["grid"], device, dtype)
        res = self.cfg.output_resolution
        images = self._sample(net, cond, seed=2, device=device, resolution=res)
        images = images[torch.argsort(torch.tensor(self._order(len(cond["caption"]))))]  # prompt order
        path = out_dir / f"cascade_step_{step}.png"
        if dist.is_main():
            k = self.ev.num_images_per_prompt
            save_png(make_grid(images, ncols=k if k > 1 else None), path)
            log_image("eval/cascade/samples", path, step, caption=" | ".join(dict.fromkeys(cond["caption"])))
        if "metrics" not in sets:
            return {}
        return self._metrics(net, device, self.cascade.lift("metrics", sets["metrics"], device, dtype),
                             "eval/cascade/", resolution=res)

    def _cascade_grid_rows(self, device: torch.device, out_dir: Path) -> dict[str, Any]:
        """The cascade grid's rows: `evaluation.prompts` when `text.encoder_path` can encode them,
        else the eval-shard captions of the ground-truth grid."""
        if not (self.ev.prompts and self.cfg.text.encoder_path):
            return self._grid_conditioning(device, out_dir)
        if self._cascade_rows is None:
            self._cascade_rows = self._prompt_rows(device, out_dir)
        return self._cascade_rows

    def _metrics(self, net, device: torch.device, cond: dict[str, Any], prefix: str,
                 resolution: Optional[int] = None) -> dict[str, float]:
        """FID and CLIP score (`prefix`fid, `prefix`clip_score) of samples for the rows of `cond` at
        `resolution` (default train_resolution), FID against `cond["image"]` (or
        evaluation.fid_stats_path, whose statistics are of train_resolution images)."""
        n = len(cond["caption"])
        res = resolution or self.cfg.train_resolution
        # Each rank scores the samples it drew (rows rank::world): only their features and cosines
        # are gathered, never the images (2048 floats per image, not 3 x T x T).
        mine = list(range(dist.rank(), n, dist.world_size()))
        fake = to_uint8(self._sample(net, cond, seed=1, device=device, gather=False, resolution=res))
        out: dict[str, float] = {}
        if self.fid_on:
            if self._inception is None:
                self._inception = load_fid_inception(self.ev.inception_path, device)
            feats = dist.all_gather_tensor(extract_features(self._inception, fake, 32, device).to(device)).cpu()
            if prefix not in self._real_stats:  # per prefix: the cascade's reals are whole images
                if self.ev.fid_stats_path and res == self.cfg.train_resolution:
                    self._real_stats[prefix] = FeatureStats.load(self.ev.fid_stats_path, resolution=res)
                else:
                    real = to_uint8(cond["image"][mine])
                    real_feats = dist.all_gather_tensor(
                        extract_features(self._inception, real, 32, device).to(device)).cpu()
                    self._real_stats[prefix] = FeatureStats.from_features(real_feats)
            out[f"{prefix}fid"] = fid_from_stats(self._real_stats[prefix], FeatureStats.from_features(feats))
        if self.clip_on:
            if self._clip is None:
                self._clip = ClipScorer(self.ev.clip_path, device)
            cos = self._clip.cosine(fake, [cond["caption"][i] for i in mine]).to(device)
            out[f"{prefix}clip_score"] = float(dist.all_gather_tensor(cos).mean())
        out[f"{prefix}num_samples"] = float(n)
        return out


def make_periodic_evaluator(cfg: Config) -> PeriodicEvaluator:
    """The Trainer's `evaluator` running the periodic evaluation (a no-op when eval_every_steps is 0)."""
    return PeriodicEvaluator(cfg)


__all__ = ["make_periodic_evaluator", "PeriodicEvaluator", "read_eval_samples", "free_memory", "sampling_dtype"]
