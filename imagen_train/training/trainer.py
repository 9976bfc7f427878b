"""The training loop of one stage: read it top to bottom.

config -> data loader -> network -> diffusion loss -> DeepSpeed engine -> EMA -> checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from imagen_train import artifacts
from imagen_train.config import Config, save_config
from imagen_train.data import build_train_loader
from imagen_train.diffusion import build_diffusion
from imagen_train.models import build_model
from imagen_train.training import checkpoint as ckpt
from imagen_train.training import engine, engine_reshard
from imagen_train.training import export, faults, preemption, resume as resuming, speed
from imagen_train.training.ema import EMA
from imagen_train.training.ema_network import EMANetwork
from imagen_train.training.preflight import checkpoint_root, preflight
from imagen_train.utils import dist
from imagen_train.utils.logging import MetricLogger
from imagen_train.utils.rng import rng_state


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite losses); the last good checkpoint stays."""


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
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.evaluator = evaluator
        self.stop = stop
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = checkpoint_root(cfg)
        preflight(cfg, dist.world_size())
        # Refuse a checkpoint of another stage, or one that cannot be re-sliced for this layout,
        # before building anything (file sizes only here; the checksums are split over the ranks
        # once the process group exists).
        candidates = self._resume_candidates(resume)
        if candidates:
            resuming.plan(candidates[0], cfg, dist.world_size())
            artifacts.refuse_other_model(candidates[0], cfg)  # names every setting that differs
        engine.init_distributed(cfg.training.dist_timeout_s)
        dist.barrier()
        self.resume_folder = self._first_intact(candidates, explicit=resume not in ("auto", "none"))
        # Same seed on every rank for the weights (ZeRO-3 partitions each rank's own copy).
        _seed_everything(cfg.training.seed)
        # training.init_from: a new run from exported weights, unless a checkpoint is resumed.
        init_from = cfg.training.init_from if self.resume_folder is None else None
        if cfg.training.init_from and not init_from:
            dist.print0(f"[train] training.init_from={cfg.training.init_from} ignored: resuming "
                        f"{self.resume_folder} (a checkpoint wins over init_from)")
        if init_from:
            export.check_init_from(cfg)
        net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
        if init_from:
            export.load_init_weights(net, cfg)  # before ZeRO-3 partitions the module
        self.flops_per_sample = speed.count_flops_per_sample(cfg)
        self.engine = engine.create_engine(cfg, net)
        dist.print0(f"[train] optimizer {engine.describe_optimizer(self.engine)}")
        self.optimizer_layout = engine_reshard.optimizer_layout(self.engine)  # saved for a re-sliced resume
        if init_from:
            # The fp32 masters from the file itself, not from the (maybe bf16) module; the EMA
            # below starts from them.
            with export.init_tensors(cfg) as read:
                engine.set_master_weights(self.engine, read)
            dist.print0(f"[train] initialised from {init_from} ({cfg.training.init_from_weights} weights)")
        self.device = engine.current_device()
        self.dtype = engine.model_dtype(self.engine)
        self.net = speed.network_caller(self.engine, cfg.training, self.dtype)  # the engine as the loss calls it
        self.diffusion = build_diffusion(cfg.diffusion)
        self.loader = build_train_loader(cfg, dist.rank(), dist.world_size())
        self.ema = EMA(engine.weight_views(self.engine), cfg.ema.decay, cfg.ema.warmup_steps,
                       cfg.ema.update_every_steps)
        self.layout = engine.partition_layout(self.engine)
        self.materialize_ema = EMANetwork(cfg, self.layout, self.ema.shadow)  # for the evaluator
        self.accum = self.engine.gradient_accumulation_steps()  # from our config (engine.build_deepspeed_config)
        self.step = 0
        self.bad_steps = 0
        self.skipped_total = 0  # updates skipped for non-finite values, this process
        self.wandb_id: Optional[str] = None
        self.last_checkpoint: Optional[Path] = None
        # Different draws on every rank from here on (the noise of each micro batch is seeded
        # in `run`, by `noise_seed`).
        _seed_everything(cfg.training.seed * 1000 + 1 + dist.rank())
        self.faults = faults.Faults()
        self.faults.arm_teardown_abort(dist.rank())
        if self.resume_folder is not None:
            self.load_checkpoint(self.resume_folder)
            dist.print0(f"[train] resumed from {self.resume_folder} at step {self.step}")
        if dist.is_main():
            save_config(cfg, self.run_dir / "config.yaml")
            ds_config = engine.build_deepspeed_config(cfg, dist.world_size(), engine.device_type() == "cpu")
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
        self.logger = MetricLogger(cfg.logging, self.run_dir, cfg.to_dict(), run_id=self.wandb_id,
                                   fresh=resume == "none")
        self.wandb_id = self.logger.run_id

    # ------------------------------------------------------------------------------------------
    def _resume_candidates(self, resume: str) -> list[Path]:
        """Checkpoints to try, most preferred first, whose files all have their manifest sizes."""
        if resume == "none":
            return []
        if resume != "auto":
            artifacts.verify(Path(resume), checksums=False)
            return [Path(resume)]
        found = []
        for tag in artifacts.resume_candidates(self.ckpt_root):
            try:
                artifacts.verify(self.ckpt_root / tag, checksums=False)
                found.append(self.ckpt_root / tag)
            except ckpt.CheckpointError as err:
                dist.print0(f"[checkpoint] skipping {tag}: {err}")
        if not found:
            dist.print0(f"[train] no checkpoint in {self.ckpt_root}: starting from scratch")
        return found

    def _first_intact(self, candidates: list[Path], explicit: bool) -> Optional[Path]:
        """The first candidate whose checksums verify (work split over the ranks), or None."""
        for folder in candidates:
            error = ckpt.verify_shared(folder)
            if error is None:
                return folder
            if explicit:
                raise ckpt.CheckpointError(error)
            dist.print0(f"[checkpoint] skipping {folder.name}: {error}")
        if candidates:
            dist.print0(f"[train] no intact checkpoint in {self.ckpt_root}: starting from scratch")
        return None

    def load_checkpoint(self, folder: Path) -> None:
        """Resume `folder`: exactly on its own layout, re-sliced onto another (training/resume.py)."""
        plan = resuming.plan(folder, self.cfg, dist.world_size())
        state = resuming.restore(plan, self.engine, self.ema, self.loader, self.layout)
        self.step = int(state["step"])
        self.bad_steps = int(state["bad_steps"])
        self.wandb_id = state.get("wandb_id")
        self.last_checkpoint = folder

    def save_checkpoint(self) -> Path:
        """Write, seal and point to the checkpoint of this step; a failed write raises loudly.

        A rank whose write fails (full disk, I/O error) raises CheckpointWriteError naming the
        checkpoint and the cause, and removes the staging folder; the other ranks then fail
        at the next collective (or its timeout). The previous checkpoint and `latest` are
        never touched before the new checkpoint is complete.
        """
        staging = ckpt.prepare_staging(self.ckpt_root, self.step)
        rank = dist.rank()
        try:
            engine.save_engine(self.engine, str(self.ckpt_root), staging.name)
            self.faults.kill_if(faults.KILL_IN_SAVE, self.step, rank)
            self.faults.raise_if_save_error(self.step, rank, str(staging))
            ckpt.save_rank_state(staging, {
                "step": self.step, "stage": self.cfg.stage, "world_size": dist.world_size(),
                "rank": rank, "ema": self.ema.state_dict(), "layout": self.layout,
                "optimizer_layout": self.optimizer_layout,
                "data": self.loader.state_dict(), "rng": rng_state(), "bad_steps": self.bad_steps,
                "wandb_id": self.wandb_id})
            if dist.is_main():
                save_config(self.cfg, staging / artifacts.CONFIG_FILE)
        except Exception as err:  # torch.save reports a full disk as RuntimeError, not OSError
            shutil.rmtree(staging, ignore_errors=True)  # give the space back; never read
            raise ckpt.CheckpointWriteError(
                f"rank {rank} could not write checkpoint step {self.step} to {staging}: "
                f"{type(err).__name__}: {err}. The previous checkpoint "
                f"{self.last_checkpoint or '(none)'} and {self.ckpt_root / ckpt.LATEST} are intact"
            ) from err
        self.last_checkpoint = ckpt.commit(self.ckpt_root, self.step, self.cfg.checkpoint.keep_last)
        return self.last_checkpoint

    # ------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()}

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.training
        stop = self.stop or preemption.StopRequest(t.stop_signals).install()
        rank = dist.rank()
        data_iter = iter(self.loader)
        progress = None
        if dist.is_main() and cfg.logging.progress_bar:
            progress = tqdm(total=t.max_steps, initial=self.step, desc=f"train {cfg.stage}",
                            unit="step", dynamic_ncols=True)
        window = self._new_window()
        stopped_by_signal = False
        stop.started()  # a stop from here on is saved at a step boundary
        try:
            while self.step < t.max_steps:
                step_start = time.perf_counter()
                # Accumulate gradients over micro batches. Nothing here waits for the device:
                # a non-finite loss gives non-finite gradients, and the update below is skipped.
                step_loss = torch.zeros((), device=self.device)  # sum of this step's finite losses
                nonfinite_losses = torch.zeros((), device=self.device)
                step_samples = 0
                for micro in range(self.accum):
                    wait_start = time.perf_counter()
                    batch = self._to_device(next(data_iter))
                    window["data_s"] += time.perf_counter() - wait_start
                    torch.manual_seed(noise_seed(t.seed, self.step, self.bad_steps, micro * dist.world_size() + rank))
                    loss = self.diffusion.training_loss(
                        self.net, batch["image"], batch["text_emb"], batch["text_mask"],
                        lowres=batch.get("lowres")).mean()
                    if self.faults.fire(faults.NAN_LOSS, self.step + 1, rank):
                        loss = loss * float("nan")
                    if self.faults.fire(faults.NAN_GRAD, self.step + 1, rank):
                        loss = faults.nan_gradient(loss)
                    self.engine.backward(loss)
                    self.engine.step()
                    finite = torch.isfinite(loss.detach())
                    step_loss += torch.where(finite, loss.detach(), 0.0)
                    nonfinite_losses += ~finite
                    step_samples += batch["image"].shape[0] * dist.world_size()

                # Non-finite gradients (from a non-finite loss or not): DeepSpeed reduces the
                # gradients, finds their global norm non-finite on every rank alike and skips the
                # update (no weight, optimizer or LR change); the step is redone with new data,
                # the same on every rank.
                if not self._update_applied():
                    cause = "loss" if dist.any_true(bool(nonfinite_losses > 0), self.device) else "gradient"
                    self._bad_step(f"non-finite {cause} at step {self.step + 1}; the update was skipped "
                                   f"on every rank")
                    stopped_by_signal = self._checkpoint(stop, due=False)
                    if stopped_by_signal:
                        break
                    continue
                window["loss"] += step_loss
                window["micro"] += self.accum
                window["samples"] += step_samples
                self.bad_steps = 0
                self.step += 1
                self.faults.kill_if(faults.KILL, self.step, rank)

                # Update EMA.
                self.ema.update(self.step)
                window["step_s"] += time.perf_counter() - step_start
                for callback in self.callbacks:
                    callback(self)
                if self.evaluator is not None:
                    self.evaluator(step=self.step, materialize_ema=self.materialize_ema, device=self.device,
                                   log=self.logger.log, log_image=self.logger.log_image,
                                   out_dir=self.run_dir / "samples",
                                   should_stop=lambda: dist.any_true(stop.requested, self.device))

                # Log.
                if self.step % t.log_every_steps == 0 or self.step == t.max_steps:
                    self._log(window)
                    window = self._new_window()
                if progress is not None:
                    progress.update(1)

                # Checkpoint (every N steps, at the end, or when asked to stop).
                stopped_by_signal = self._checkpoint(stop, due=(
                    self.step % cfg.checkpoint.every_steps == 0 or self.step == t.max_steps))
                if stopped_by_signal:
                    break
        finally:
            if stop is not self.stop:
                stop.restore()
            if progress is not None:
                progress.close()
            self.logger.close()
        return TrainResult(self.step, stopped_by_signal, self.last_checkpoint)

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
            dist.print0(f"[train] stop requested ({stop.reason or 'on another rank'}): "
                        f"saved step {self.step} and exiting")
        return stopping

    def _new_window(self) -> dict:
        """Sums over the steps since the last log line; the loss stays on the device until then."""
        return {"loss": torch.zeros((), device=self.device), "micro": 0, "data_s": 0.0, "step_s": 0.0,
                "samples": 0}

    def _bad_step(self, what: str) -> None:
        """Count a skipped update (identical on every rank); stop after too many in a row."""
        self.bad_steps += 1
        self.skipped_total += 1
        dist.print0(f"[train] {what} ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.training.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_steps} non-finite losses in a row (losses or gradients; training.max_bad_steps="
                f"{self.cfg.training.max_bad_steps}); the last good checkpoint is {self.last_checkpoint}")

    def _update_applied(self) -> bool:
        """Whether the optimizer step just taken changed the weights (False: skipped by DeepSpeed).

        DeepSpeed's ZeRO 1-3 optimizers skip a step whose all-reduced gradient norm is not
        finite (fp32, bf16 and fp16 alike); the decision comes from an all-reduced value, so
        every rank agrees. Where a step with a non-finite norm was applied anyway the weights
        are lost: stop rather than train on.
        """
        if not self.engine.was_step_applied():
            return False
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise TrainingStopped(f"a non-finite gradient (norm {norm}) was applied at step {self.step + 1} "
                                  f"(ZeRO stage {self.cfg.training.zero_stage} does not skip it); the last "
                                  f"good checkpoint is {self.last_checkpoint}")
        return True

    def _log(self, window: dict) -> None:
        loss = dist.mean_over_ranks((window["loss"] / max(1, window["micro"])).reshape(1))
        samples_per_s = window["samples"] / max(window["step_s"], 1e-9)
        metrics = {
            "train/loss": loss.item(),
            "train/lr": self.engine.get_lr()[0],
            "perf/samples_per_s": samples_per_s,
            "perf/data_wait_s": window["data_s"],
            "perf/step_s": window["step_s"] / max(1, self.cfg.training.log_every_steps),
            "train/skipped_total": self.skipped_total,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.engine.fp16_enabled():
            metrics["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        if self.flops_per_sample:
            # Forward + backward ~ 3x forward FLOPs; per rank.
            metrics["perf/tflops_per_rank"] = 3 * self.flops_per_sample * samples_per_s / dist.world_size() / 1e12
        if torch.cuda.is_available():
            metrics["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(metrics, self.step)
        dist.print0(f"[train] step {self.step} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
                    f"{samples_per_s:.1f} samples/s")
