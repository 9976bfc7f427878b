"""The trainer's engine on DeepSpeed: `training/engine_api.py`'s `Engine`, and the only module that
drives DeepSpeed.

`create_engine` wraps the network in `deepspeed.initialize` with the DeepSpeed config built from
ours (training/deepspeed_config.py), our LR schedule and the speed options, and returns a
`DeepSpeedEngine`; `init_distributed` joins the process group with a timeout. What goes below
DeepSpeed's documented API (the fp32 master slices for the EMA, the ZeRO-0 overflow check, what
a re-slice reads) is in training/deepspeed_internals.py; re-slicing itself is
training/engine_reshard.py.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from imagen_train.config import Config, ConfigError
# deepspeed_internals sets DS_ACCELERATOR before DeepSpeed loads.
from imagen_train.training import deepspeed_internals as internals
from imagen_train.training import engine_reshard, speed
from imagen_train.training.deepspeed_config import (TORCH_ADAM_PARAMS, build_deepspeed_config,
                                                    compiled_optimizer_op)
from imagen_train.training.engine_api import MasterLayout
from imagen_train.training.lr_schedule import build_lr_scheduler
from imagen_train.utils import dist

import deepspeed  # noqa: I100
from deepspeed.accelerator import get_accelerator

__all__ = ["DeepSpeedEngine", "build_deepspeed_config", "build_optimizer_op", "compiled_optimizer_op",
           "create_engine", "current_device", "describe_optimizer", "device_type", "init_distributed"]


def device_type() -> str:
    """'cuda' on a GPU node, else 'cpu' (DeepSpeed's CPU accelerator)."""
    return get_accelerator().device_name()


def init_distributed(timeout_s: int) -> None:
    """Join the process group (gloo on a CPU, nccl on GPUs) with a collective timeout."""
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device_type() == "cuda" else "gloo"
    internals.skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device_type() == "cuda":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))


def current_device() -> torch.device:
    """The device of this rank (its GPU, or the CPU)."""
    return torch.device(get_accelerator().current_device_name())


# Where DeepSpeed builds an op just in time, the variables that decide whether the build works.
BUILD_ENVIRONMENT = ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "TORCH_EXTENSIONS_DIR")


def build_optimizer_op(cfg: Config) -> None:
    """Build or load the compiled optimizer op the config asks for, before any data or model work.

    DeepSpeed otherwise builds it inside `deepspeed.initialize`, after the data and the network,
    and a failure there (no nvcc, an nvcc that does not match torch, or an arch list such as
    `9.0a` that its builder cannot parse) surfaces as a compiler traceback. Raises ConfigError
    naming the setting and the environment that decides the build.
    """
    name = compiled_optimizer_op(cfg)
    if name is None:
        return
    key = "training.offload_optimizer" if cfg.training.offload_optimizer else "optim.implementation"
    try:
        get_accelerator().create_op_builder(name).load(verbose=False)
    except Exception as err:  # builders raise RuntimeError, ValueError, CalledProcessError, ImportError...
        first = (str(err).strip().splitlines() or [""])[0][:300]
        environment = ", ".join(f"{var}={os.environ[var]!r}" if var in os.environ else f"{var} unset"
                                for var in BUILD_ENVIRONMENT)
        offload = key == "training.offload_optimizer"
        fix = "'false' (AdamW in GPU memory, nothing to build)" if offload else \
            "'torch-fused' (torch's fused AdamW, nothing to build)"
        found = True if offload else cfg.optim.implementation
        raise ConfigError(key, f"{fix}, or a machine where DeepSpeed can build its {name} op: a compiler "
                          f"matching torch (nvcc from CUDA_HOME on a GPU node, gcc on a CPU) and a "
                          f"TORCH_CUDA_ARCH_LIST of plain archs such as '9.0' ({environment})",
                          f"{found} ({type(err).__name__}: {first})") from None


def describe_optimizer(engine) -> str:
    """E.g. 'AdamW(fused=True) under DeepSpeedZeroOptimizer', for the run's log."""
    opt = internals.torch_optimizer(engine)
    flags = [f"{flag}={opt.param_groups[0][flag]}" for flag in ("fused", "foreach")
             if opt.param_groups and opt.param_groups[0].get(flag)]
    wrapper = "" if engine.optimizer is opt else f" under {type(engine.optimizer).__name__}"
    return f"{type(opt).__name__}({', '.join(flags)}){wrapper}"


def _check_optimizer(cfg: Config, engine) -> None:
    """Fail if the AdamW kernel asked for is not the one DeepSpeed built (the switch is easy to lose)."""
    if compiled_optimizer_op(cfg) is not None:
        return
    opt = internals.torch_optimizer(engine)
    wanted = TORCH_ADAM_PARAMS[cfg.optim.implementation]
    flag = "fused" if "fused" in wanted else "foreach"
    if not isinstance(opt, torch.optim.AdamW) or not all(g.get(flag) for g in opt.param_groups):
        raise ConfigError("optim.implementation", f"an engine stepping torch.optim.AdamW({flag}=True)",
                          f"{cfg.optim.implementation} (DeepSpeed built {type(opt).__name__} with "
                          f"{flag}={[g.get(flag) for g in opt.param_groups]}; check training.deepspeed_extra)")


def model_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed runs the module in."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def create_engine(cfg: Config, model: torch.nn.Module) -> "DeepSpeedEngine":
    """Wrap `model` in a DeepSpeed engine with AdamW and our LR schedule."""
    ds_config = build_deepspeed_config(cfg, dist.world_size(), device_type() == "cpu")
    internals.skip_shm_comm_op()  # deepspeed.initialize joins DeepSpeed's comm if init_distributed did not
    ds, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.lr_schedule, cfg.training.max_steps))
    _check_optimizer(cfg, ds)
    internals.skip_nonfinite_steps(ds)
    # Activation checkpointing, the fused norm, cuDNN's search and torch.compile, applied to the
    # module in place (parameter names, checkpoints and the EMA unchanged): training/speed.py.
    speed.apply_speed_options(ds.module, cfg)
    return DeepSpeedEngine(ds, ds_config)


class DeepSpeedEngine:
    """training/engine_api.py's `Engine` on a DeepSpeed engine.

    `deepspeed` is DeepSpeed's own engine, for tests and benchmarks that check it against
    DeepSpeed's API; the trainer never reads it.
    """

    def __init__(self, ds, ds_config: dict[str, Any]):
        self.deepspeed = ds
        self.ds_config = ds_config
        self.device = current_device()
        self.dtype = model_dtype(ds)
        self.accum_steps = ds.gradient_accumulation_steps()  # from our config (build_deepspeed_config)
        self._slices = internals.master_slices(ds)
        self._micro_batches = 0  # backward passes since the last update

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The module's forward, through DeepSpeed (ZeRO-3 gathers the parameters here)."""
        return self.deepspeed(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward; and its step except after the last micro batch, where it only
        counts the micro batch (DeepSpeed wants a step after every backward)."""
        self.deepspeed.backward(loss)
        self._micro_batches += 1
        if self._micro_batches < self.accum_steps:
            self.deepspeed.step()

    def step(self) -> bool:
        """DeepSpeed's step at the accumulation boundary: it reduces the gradients, finds their
        global norm and skips the update (weights, optimizer, LR) when it is not finite, at
        every ZeRO stage (ZeRO-0 through deepspeed_internals.skip_nonfinite_steps)."""
        if self._micro_batches != self.accum_steps:
            raise RuntimeError(f"step() after {self._micro_batches} micro batches; this engine "
                               f"accumulates {self.accum_steps}")
        self._micro_batches = 0
        self.deepspeed.step()
        return bool(self.deepspeed.was_step_applied())

    def grad_norm(self) -> Optional[float]:
        """DeepSpeed's global norm of the last step's gradients (None where it computes none)."""
        norm = self.deepspeed.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        """The LR of the optimizer's first group, as the schedule left it."""
        return self.deepspeed.get_lr()[0]

    def loss_scale(self) -> Optional[float]:
        """fp16's dynamic loss scale; None in fp32 and bf16."""
        return internals.loss_scale(self.deepspeed) if self.deepspeed.fp16_enabled() else None

    def master_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """This rank's slices of the fp32 master weights (deepspeed_internals.master_slices), so
        the EMA averages what the optimizer updates, not its bf16 rounding, at every ZeRO stage;
        each rank keeps only its slice (1/world of the model per rank), no communication."""
        return ((name, get()) for name, _, _, _, get in self._slices)

    def master_layout(self) -> MasterLayout:
        """The [start, end) of every flattened parameter that this rank's master slice covers."""
        return {name: {"shape": shape, "numel": int(torch.Size(shape).numel()), "start": start, "end": end}
                for name, shape, start, end, _ in self._slices}

    def set_master_weights(self, read: Callable[[str], torch.Tensor]) -> None:
        """For a run started from given weights in bf16: DeepSpeed builds the masters from the
        bf16 module, so without this they would start at the bf16 rounding of the given weights."""
        internals.set_master_weights(self.deepspeed, read)

    def optimizer_layout(self) -> Optional[dict[str, Any]]:
        """Where this rank's optimizer keeps each parameter (training/engine_reshard.py)."""
        return engine_reshard.optimizer_layout(self.deepspeed)

    def save(self, folder: Path) -> None:
        """DeepSpeed's files of this rank (model, optimizer partition, LR schedule) into `folder`."""
        self.deepspeed.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        """DeepSpeed's own load of a checkpoint of this layout: optimizer and LR schedule included."""
        path, _ = self.deepspeed.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")

    def load_resharded(self, folder: Path, layouts: list[dict[str, Any]]) -> dict[str, int]:
        """A checkpoint of another layout, re-sliced (training/engine_reshard.py)."""
        return engine_reshard.load_resharded(self.deepspeed, folder, layouts)

    def describe(self) -> str:
        """E.g. 'AdamW(fused=True) under DeepSpeedZeroOptimizer'."""
        return describe_optimizer(self.deepspeed)

    def config_files(self) -> dict[str, dict[str, Any]]:
        """The DeepSpeed config the engine was built with, as run_dir/deepspeed_config.json."""
        return {"deepspeed_config.json": self.ds_config}
