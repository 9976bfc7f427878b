"""The training loop of one stage: read `Trainer.run` top to bottom.

config -> data loader -> network -> diffusion loss -> engine -> EMA -> checkpoints.

The trainer talks to its engine through training/engine_api.py (DeepSpeed's is
training/engine.py); the pieces around the loop have a file each: which checkpoint to resume
and how (resume.py), writing one (checkpoint.py), skipped updates (bad_steps.py), the metrics
of a log line (step_metrics.py), stop requests (preemption.py).
"""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from imagen_train.config import Config, save_config
from imagen_train.data import build_train_loader
from imagen_train.diffusion import build_diffusion
from imagen_train.models import build_model
from imagen_train.training import checkpoint as ckpt
from imagen_train.training import init_from, preemption, resume as resuming, speed
from imagen_train.training.bad_steps import BadSteps, TrainingStopped
from imagen_train.training.ema import EMA
from imagen_train.training.ema_network import EMANetwork
from imagen_train.training.engine import create_engine, init_distributed  # the Engine on DeepSpeed
from imagen_train.training.engine_api import Engine
from imagen_train.training.preflight import checkpoint_root, preflight
from imagen_train.training.step_metrics import StepMetrics
from imagen_train.utils import dist
from imagen_train.utils.logging import MetricLogger
from imagen_train.utils.rng import rng_state

__all__ = ["TrainResult", "Trainer", "TrainingStopped", "noise_seed"]


@dataclass
class TrainResult:
    step: int
    stopped_by_signal: bool
    last_checkpoint: Optional[Path]


def noise_seed(seed: int, step: int, attempt: int, micro_batch: int) -> int:
    """The seed of one micro batch's diffusion noise (and any other draw of its step).

    `micro_batch` is the global index `accumulation step x ranks + rank`, so the noise of a
    batch is the same whatever the ranks and accumulation steps: runs of any layout, and a run
    resumed onto another, draw the same noise for the same batch. `attempt` counts the updates
    skipped in a row (a redone step draws new noise).
    """
    return int(np.random.SeedSequence([seed, step, attempt, micro_batch]).generate_state(1, np.uint64)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Trains one stage; `run()` returns when max_steps is reached or a signal asks it to stop.

    `callbacks` are called as `callback(trainer)` after every optimizer step and EMA update, on
    every rank. `evaluator` (periodic evaluation) is called after them, on every rank, with
    only what it needs: `evaluator(step=, materialize_ema=, device=, log=, log_image=, out_dir=,
    should_stop=)`, where `materialize_ema(dtype, device)` builds the EMA network
    (training/ema_network.py; see evaluation/periodic.py); it decides itself whether the step is
    due, and asks `should_stop()` (the ranks' agreed stop request) between its batches. `stop`:
    a StopRequest installed by the caller for the whole process (launch/train.py); None: `run()`
    installs one for its own duration.
    """

    def __init__(self, cfg: Config, resume: str = "auto",
                 callbacks: Optional[list[Callable[["Trainer"], None]]] = None,
                 stop: Optional[preemption.StopRequest] = None,
                 evaluator: Optional[Callable[..., None]] = None):
        self.cfg, self.callbacks, self.evaluator, self.stop = cfg, list(callbacks or []), evaluator, stop
        self.run_dir, self.ckpt_root = Path(cfg.run_dir), checkpoint_root(cfg)
        preflight(cfg, dist.world_size())
        # Refuse a checkpoint of another stage, or one that cannot be re-sliced for this layout,
        # before building anything; the checksums are split over the ranks once they are joined.
        candidates = resuming.candidates(resume, cfg, self.ckpt_root)
        init_distributed(cfg.training.dist_timeout_s)
        dist.barrier()
        self.resume_folder = resuming.first_intact(candidates, resume not in ("auto", "none"), self.ckpt_root)
        # Same seed on every rank for the weights (ZeRO-3 partitions each rank's own copy).
        _seed_everything(cfg.training.seed)
        self.engine = self._build_engine()
        self.device = self.engine.device
        self.net = speed.network_caller(self.engine, cfg.training, self.engine.dtype)  # as the loss calls it
        self.diffusion = build_diffusion(cfg.diffusion)
        self.loader = build_train_loader(cfg, dist.rank(), dist.world_size())
        self.ema = EMA(self.engine.master_weights, cfg.ema.decay, cfg.ema.warmup_steps, cfg.ema.update_every_steps)
        self.layout = self.engine.master_layout()
        self.materialize_ema = EMANetwork(cfg, self.layout, self.ema.shadow)  # for the evaluator
        self.accum = self.engine.accum_steps
        self.step = 0
        self.bad_steps = BadSteps(cfg.training.max_bad_steps, cfg.training.zero_stage, lambda: self.last_checkpoint)
        self.wandb_id: Optional[str] = None
        self.last_checkpoint: Optional[Path] = None
        # Different draws on every rank from here on (the noise of each micro batch is seeded
        # in `run`, by `noise_seed`).
        _seed_everything(cfg.training.seed * 1000 + 1 + dist.rank())
        if self.resume_folder is not None:
            self.load_checkpoint(self.resume_folder)
            dist.print0(f"[train] resumed from {self.resume_folder} at step {self.step}")
        if dist.is_main():
            save_config(cfg, self.run_dir / "config.yaml")
            for name, content in self.engine.config_files().items():
                (self.run_dir / name).write_text(json.dumps(content, indent=1) + "\n")
        self.logger = MetricLogger(cfg.logging, self.run_dir, cfg.to_dict(), run_id=self.wandb_id,
                                   fresh=resume == "none")
        self.wandb_id = self.logger.run_id

    def _build_engine(self) -> Engine:
        """The network in its engine: from `training.init_from`'s weights for a new run given
        them (a resumed checkpoint wins over init_from), else freshly initialised."""
        cfg = self.cfg
        init_path = cfg.training.init_from if self.resume_folder is None else None
        if cfg.training.init_from and not init_path:
            dist.print0(f"[train] training.init_from={cfg.training.init_from} ignored: resuming "
                        f"{self.resume_folder} (a checkpoint wins over init_from)")
        if init_path:
            init_from.check_init_from(cfg)
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
        if init_path:
            init_from.load_init_weights(net, cfg)  # before ZeRO-3 partitions the module
        self.flops_per_sample = speed.count_flops_per_sample(cfg)
        built = create_engine(cfg, net)
        dist.print0(f"[train] optimizer {built.describe()}")
        self.optimizer_layout = built.optimizer_layout()  # saved for a re-sliced resume
        if init_path:
            # The fp32 masters from the file itself, not from the (maybe bf16) module; the EMA
            # starts from them.
            with init_from.init_tensors(cfg) as read:
                built.set_master_weights(read)
            dist.print0(f"[train] initialised from {init_path} ({cfg.training.init_from_weights} weights)")
        return built

    # Checkpoints ---------------------------------------------------------------------------------
    def load_checkpoint(self, folder: Path) -> None:
        """Resume `folder`: exactly on its own layout, re-sliced onto another (training/resume.py)."""
        plan = resuming.plan(folder, self.cfg, dist.world_size())
        state = resuming.restore(plan, self.engine, self.ema, self.loader, self.layout)
        self.step = int(state["step"])
        self.bad_steps.in_a_row = int(state["bad_steps"])
        self.wandb_id = state.get("wandb_id")
        self.last_checkpoint = folder

    def save_checkpoint(self) -> Path:
        """Write, seal and point to the checkpoint of this step (training/checkpoint.py `save`)."""
        self.last_checkpoint = ckpt.save(self.ckpt_root, self.step, self.engine, self._rank_state, self.cfg,
                                         previous=self.last_checkpoint)
        return self.last_checkpoint

    def _rank_state(self) -> dict:
        """This rank's own part of a checkpoint, taken once the engine has saved its files."""
        return {"step": self.step, "stage": self.cfg.stage, "world_size": dist.world_size(), "rank": dist.rank(),
                "ema": self.ema.state_dict(), "layout": self.layout, "optimizer_layout": self.optimizer_layout,
                "data": self.loader.state_dict(), "rng": rng_state(), "bad_steps": self.bad_steps.in_a_row,
                "wandb_id": self.wandb_id}

    def _checkpoint(self, stop: preemption.StopRequest, due: bool) -> bool:
        """Save if `due` or a stop is asked for; True (on every rank alike) when the run must stop.

        A stop asked for while the save was written is honoured right after it, without a
        second save of the step; a step already saved (a skipped update after a save) is not
        written again.
        """
        stopping = dist.any_true(stop.requested, self.device)
        saved = self.last_checkpoint is not None and self.last_checkpoint.name == ckpt.tag_for(self.step)
        if (due or stopping) and not saved:
            dist.print0(f"[train] checkpoint {self.save_checkpoint()}")
            stopping = stopping or dist.any_true(stop.requested, self.device)
        if stopping:
            if stop.reason and dist.rank() != 0:  # why, from the rank that saw it first, when rank 0 did not
                print(f"[train] rank {dist.rank()}: stop requested ({stop.reason})", flush=True)
            dist.print0(f"[train] stop requested ({stop.reason or 'on another rank'}): "
                        f"saved step {self.step} and exiting")
        return stopping

    # The loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to `training.max_steps`, or until a stop request has been saved."""
        t, world, rank = self.cfg.training, dist.world_size(), dist.rank()
        metrics = StepMetrics(self.device, self.flops_per_sample, t.log_every_steps)
        with self._running() as (data, stop, progress):
            while self.step < t.max_steps:
                step_start = time.perf_counter()
                # Accumulate gradients. Nothing here waits for the device: a non-finite loss gives
                # non-finite gradients, and the engine skips the update below.
                for micro in range(self.accum):
                    wait_start = time.perf_counter()
                    batch = _to_device(next(data), self.device)
                    metrics.data_s += time.perf_counter() - wait_start
                    torch.manual_seed(noise_seed(t.seed, self.step, self.bad_steps.in_a_row, micro * world + rank))
                    loss = self.diffusion.training_loss(self.net, batch["image"], batch["text_emb"],
                                                        batch["text_mask"], lowres=batch.get("lowres")).mean()
                    self.engine.backward(loss)
                    metrics.add_loss(loss, batch["image"].shape[0] * world)

                # Update the weights. Non-finite gradients on any rank: the engine skips the update
                # on every rank alike, and the step is redone with new data (training/bad_steps.py).
                if not self.engine.step():
                    self.bad_steps.skipped(self.step + 1, nonfinite_loss=metrics.drop_step())
                    if self._checkpoint(stop, due=False):
                        return TrainResult(self.step, True, self.last_checkpoint)
                    continue
                self.bad_steps.applied(self.step + 1, self.engine.grad_norm())
                metrics.keep_step()
                self.step += 1

                # Update EMA.
                self.ema.update(self.step)
                metrics.step_s += time.perf_counter() - step_start
                for callback in self.callbacks:
                    callback(self)

                # Evaluate (the evaluator decides whether this step is due).
                if self.evaluator is not None:
                    self.evaluator(step=self.step, materialize_ema=self.materialize_ema, device=self.device,
                                   log=self.logger.log, log_image=self.logger.log_image,
                                   out_dir=self.run_dir / "samples",
                                   should_stop=lambda: dist.any_true(stop.requested, self.device))

                # Log.
                if self.step % t.log_every_steps == 0 or self.step == t.max_steps:
                    metrics.log(self.logger, self.step, self.engine, self.bad_steps.skipped_total)
                if progress is not None:
                    progress.update(1)

                # Checkpoint (every N steps, at the end, or when asked to stop).
                due = self.step % self.cfg.checkpoint.every_steps == 0 or self.step == t.max_steps
                if self._checkpoint(stop, due):
                    return TrainResult(self.step, True, self.last_checkpoint)
        return TrainResult(self.step, False, self.last_checkpoint)

    @contextmanager
    def _running(self) -> Iterator[tuple[Iterator[dict], preemption.StopRequest, Optional[tqdm]]]:
        """Around the loop: the stop request (a stop from the first step on is saved at a step
        boundary), the batches and the progress bar; undone, and the loader and logger closed, after it."""
        stop = self.stop or preemption.StopRequest(self.cfg.training.stop_signals).install()
        data = iter(self.loader)
        progress = None
        if dist.is_main() and self.cfg.logging.progress_bar:
            progress = tqdm(total=self.cfg.training.max_steps, initial=self.step, desc=f"train {self.cfg.stage}",
                            unit="step", dynamic_ncols=True)
        stop.started()
        try:
            yield data, stop, progress
        finally:
            if stop is not self.stop:
                stop.restore()
            if progress is not None:
                progress.close()
            # Stop the DataLoader workers now, not whenever the Trainer is collected: a worker
            # still registered at exit is SIGKILLed by the exit hook (it ignores SIGTERM), and
            # torch's SIGCHLD handler then raises "DataLoader worker ... is killed by signal".
            self.loader.close()
            self.logger.close()
