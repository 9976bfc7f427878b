"""The DeepSpeed boundary: the only module that imports deepspeed.

Builds the DeepSpeed config from our dataclasses (so batch size and precision have one source
of truth), initialises the process group with a timeout, wraps `deepspeed.initialize`, and
gives the rest of the trainer plain views of the weights (for the EMA) and of checkpoints.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Iterable

import torch

from imagen_train.config import Config, ConfigError
from imagen_train.training.lr_schedule import build_lr_scheduler

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR is set)
from deepspeed.accelerator import get_accelerator  # noqa: E402


def device_type() -> str:
    """'cuda' on a GPU node, else 'cpu' (DeepSpeed's CPU accelerator)."""
    return get_accelerator().device_name()


def init_distributed(timeout_s: int) -> None:
    """Join the process group (gloo on a CPU, nccl on GPUs) with a collective timeout."""
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device_type() == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device_type() == "cuda":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))


def current_device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def build_deepspeed_config(cfg: Config, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours; `training.deepspeed_extra` is merged over it."""
    t = cfg.training
    if on_cpu and t.precision == "fp16":
        raise ConfigError("training.precision", "'fp32' or 'bf16' on a CPU (DeepSpeed refuses fp16 "
                          "there; bf16 convolutions are ~70x slower than fp32 on AVX2 CPUs)", "fp16")
    if t.offload_optimizer and on_cpu:
        raise ConfigError("training.offload_optimizer", "false on a CPU run (nothing to offload to)", True)
    accum = t.grad_accum_for(world_size)
    adam = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}
    if on_cpu:
        adam["torch_adam"] = True  # no compiled fused kernel on a CPU
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(overlap_comm=not on_cpu, contiguous_gradients=True)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return _merge(ds, t.deepspeed_extra)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def create_engine(cfg: Config, model: torch.nn.Module):
    """Wrap `model` in a DeepSpeed engine with AdamW and our LR schedule."""
    on_cpu = device_type() == "cpu"
    ds_config = build_deepspeed_config(cfg, torch.distributed.get_world_size(), on_cpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.schedule, cfg.training.max_steps))
    _skip_nonfinite_steps(engine)
    if cfg.training.compile:
        # torch.compile of the module in place (nn.Module.compile): parameter names, and so
        # checkpoints and the EMA, are unchanged.
        engine.compile()
    return engine


def _skip_nonfinite_steps(engine) -> None:
    """Give an optimizer without DeepSpeed's overflow check (ZeRO-0) one.

    ZeRO 1-3 skip a step whose all-reduced gradient norm is not finite and say so through
    `optimizer.overflow`, which the engine reads to skip the LR step and report
    `was_step_applied() == False`. Without ZeRO the bare optimizer would apply NaN gradients;
    here its `step` checks the gradients (already all-reduced, so identical on every rank)
    and follows the same contract.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow"):
        return
    inner_step = opt.step

    def step(*args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if opt.overflow:
            return None
        return inner_step(*args, **kwargs)

    opt.overflow = False
    opt.step = step


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def _slice_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """ZeRO-3's partitioning of a flattened tensor: equal parts of ceil(numel / world)."""
    part = -(-numel // world)
    return min(rank * part, numel), min((rank + 1) * part, numel)


def weight_views(engine) -> Callable[[], Iterable[tuple[str, torch.Tensor]]]:
    """A function returning the (name, tensor) pairs of the weights this rank keeps an EMA of.

    Each rank owns one contiguous slice of every flattened parameter, so the EMA costs 1/world
    of the model's memory per rank at every ZeRO stage, and needs no communication.
    ZeRO-3: the local fp32 master partition (padded to equal size, as DeepSpeed keeps it).
    ZeRO 0-2: the same slice of the full parameter as the model holds it.
    """
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if is_zero3(engine):
        from deepspeed.utils import safe_get_local_fp32_param
        return lambda: ((n, safe_get_local_fp32_param(p)) for n, p in named)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    bounds = {n: _slice_bounds(p.numel(), rank, world) for n, p in named}
    return lambda: ((n, p.data.view(-1)[bounds[n][0]:bounds[n][1]]) for n, p in named)


def partition_layout(engine) -> dict[str, dict[str, Any]]:
    """Per parameter: its full shape and element count, for stitching the ranks' EMA slices."""
    layout = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        shape = list(p.ds_shape) if is_zero3(engine) else list(p.shape)
        layout[name] = {"shape": shape, "numel": int(torch.Size(shape).numel())}
    return layout


def save_engine(engine, folder: str, tag: str) -> None:
    """DeepSpeed's part of a checkpoint (model, optimizer, LR schedule), into `folder/tag`."""
    engine.save_checkpoint(folder, tag=tag, save_latest=False)


def load_engine(engine, folder: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}/{tag}")


def consolidated_weights(folder: str, tag: str) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) fp32 weights of a checkpoint of any ZeRO stage, on one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
