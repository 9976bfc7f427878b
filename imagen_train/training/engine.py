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

from imagen_train.config import Config, ConfigError, TrainingConfig
from imagen_train.training import speed
from imagen_train.training.lr_schedule import build_lr_scheduler

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR is set)
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param  # noqa: E402


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
    else:
        unlink_shm_buffer()


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU all-reduce keeps this job's shared-memory buffer of `rank`
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: uid, MASTER_ADDR, MASTER_PORT and rank in the name)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_buffer() -> None:
    """Remove this rank's shared-memory all-reduce buffer's name once every rank has mapped it.

    DeepSpeed's CPU backend creates one buffer (~66 MB) per rank in /dev/shm and never removes
    it, so every CPU run left them behind until /dev/shm filled the machine's memory. After a
    barrier every rank has mapped every peer's buffer (its set-up waits for them), so the names
    can go: the mappings live on until the processes exit, killed or not.
    """
    torch.distributed.barrier()
    try:
        os.unlink(shm_buffer_path(torch.distributed.get_rank()))
    except FileNotFoundError:  # not all ranks local (no shm all-reduce), or another build
        pass


def current_device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def build_deepspeed_config(cfg: Config, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours; `training.deepspeed_extra` is merged over it."""
    training = cfg.training
    if on_cpu and training.precision == "fp16":
        raise ConfigError("training.precision", "'fp32' or 'bf16' on a CPU (DeepSpeed refuses fp16 "
                          "there; bf16 convolutions are ~70x slower than fp32 on AVX2 CPUs)", "fp16")
    if training.offload_optimizer and on_cpu:
        raise ConfigError("training.offload_optimizer", "false on a CPU run (nothing to offload to)", True)
    accum = training.grad_accum_for(world_size)
    adam = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}
    if not training.offload_optimizer:  # offloaded states are stepped by DeepSpeed's compiled CPU Adam
        adam.update(TORCH_ADAM_PARAMS.get(cfg.optim.implementation, {}))
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.zero_stage >= 2:
        zero.update(overlap_comm=not on_cpu, contiguous_gradients=True)
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": training.global_batch_size,
        "gradient_clipping": training.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if training.precision == "bf16":
        ds_config["bf16"] = {"enabled": True}
    elif training.precision == "fp16":
        ds_config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if grad_accum_dtype(training) is not None:
        ds_config["data_types"] = {"grad_accum_dtype": grad_accum_dtype(training)}
    return _merge(ds_config, training.deepspeed_extra)


def grad_accum_dtype(training: TrainingConfig) -> str | None:
    """DeepSpeed's `data_types.grad_accum_dtype` for `training.grad_accum_dtype`; None leaves
    DeepSpeed's default (the model's dtype).

    DeepSpeed 0.19.8 honours it at ZeRO 1-3 (engine.get_data_types): ZeRO-1 under bf16 then
    runs BF16_Optimizer with fp32 gradient buffers for the whole model, ZeRO-2 sums each
    rank's reduced gradient partition into an fp32 buffer, ZeRO-3 keeps its gradient
    partitions in fp32. Without ZeRO it refuses a dtype other than the model's.
    """
    if training.precision == "fp32":
        return None
    if training.grad_accum_dtype == "auto":
        return "fp32" if training.precision == "bf16" and training.zero_stage >= 1 else None
    return training.grad_accum_dtype


# optim.implementation -> the AdamW params that make DeepSpeed step torch's AdamW (its
# `torch_adam` switch; DeepSpeed passes the other params on to torch.optim.AdamW).
TORCH_ADAM_PARAMS = {"torch-fused": {"torch_adam": True, "fused": True},
                     "torch-foreach": {"torch_adam": True, "foreach": True}}

# Where DeepSpeed builds an op just in time, the variables that decide whether the build works.
BUILD_ENVIRONMENT = ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "TORCH_EXTENSIONS_DIR")


def compiled_optimizer_op(cfg: Config) -> str | None:
    """The DeepSpeed op builder the run's optimizer needs built, or None (torch's AdamW)."""
    if cfg.training.offload_optimizer:
        return "CPUAdamBuilder"
    if cfg.optim.implementation == "deepspeed-fused":
        return "FusedAdamBuilder"
    return None


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


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer that updates the weights, under DeepSpeed's ZeRO or mixed-precision wrapper."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def describe_optimizer(engine) -> str:
    """E.g. 'AdamW(fused=True) under DeepSpeedZeroOptimizer', for the run's log."""
    opt = torch_optimizer(engine)
    flags = [f"{flag}={opt.param_groups[0][flag]}" for flag in ("fused", "foreach")
             if opt.param_groups and opt.param_groups[0].get(flag)]
    wrapper = "" if engine.optimizer is opt else f" under {type(engine.optimizer).__name__}"
    return f"{type(opt).__name__}({', '.join(flags)}){wrapper}"


def _check_optimizer(cfg: Config, engine) -> None:
    """Fail if the AdamW kernel asked for is not the one DeepSpeed built (the switch is easy to lose)."""
    if compiled_optimizer_op(cfg) is not None:
        return
    opt = torch_optimizer(engine)
    wanted = TORCH_ADAM_PARAMS[cfg.optim.implementation]
    flag = "fused" if "fused" in wanted else "foreach"
    if not isinstance(opt, torch.optim.AdamW) or not all(g.get(flag) for g in opt.param_groups):
        raise ConfigError("optim.implementation", f"an engine stepping torch.optim.AdamW({flag}=True)",
                          f"{cfg.optim.implementation} (DeepSpeed built {type(opt).__name__} with "
                          f"{flag}={[g.get(flag) for g in opt.param_groups]}; check training.deepspeed_extra)")


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
        lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.lr_schedule, cfg.training.max_steps))
    _check_optimizer(cfg, engine)
    _skip_nonfinite_steps(engine)
    # Activation checkpointing, the fused norm, cuDNN's search and torch.compile, applied to the
    # module in place (parameter names, checkpoints and the EMA unchanged): training/speed.py.
    speed.apply_speed_options(engine.module, cfg)
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


# One parameter's fp32 master slice on this rank: (name, full shape, start, end, get), where
# `get()` returns the slice [start, end) of the flattened fp32 master, as a view that the
# optimizer updates in place (read it again after a checkpoint load: DeepSpeed relinks).
_MasterSlice = tuple[str, list[int], int, int, Callable[[], torch.Tensor]]


def _master_slices(engine) -> list[_MasterSlice]:
    """Where this rank's fp32 master weights are, per trainable parameter.

    ZeRO-3: the local partition of `safe_get_local_fp32_param`, less its padding (equal parts
    of ceil(numel / world)). ZeRO 1-2, fp32 or bf16 (DeepSpeedZeroOptimizer, BF16_Optimizer):
    the fragment of each parameter that falls in this rank's flat fp32 partition; its bounds
    follow DeepSpeed's partitioning of the flattened group, so a rank may hold all, part or
    none of a parameter. ZeRO-0: the fp32 master (the module's own weight in an fp32 run, the
    FP16_Optimizer's copy in a bf16/fp16 run), cut in equal parts over the ranks.
    """
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out: list[_MasterSlice] = []
    if is_zero3(engine):
        for n, p in named:
            start, end = _slice_bounds(p.ds_numel, rank, world)
            out.append((n, list(p.ds_shape), start, end,
                        lambda p=p, k=end - start: safe_get_local_fp32_param(p).view(-1)[:k]))
        return out
    if named and all(hasattr(p, "_hp_mapping") for _, p in named):
        def fragment(p: torch.nn.Parameter) -> torch.Tensor:
            mapping = p._hp_mapping
            if mapping is None:  # no element of p in this rank's partition
                return torch.zeros(0, dtype=torch.float32, device=p.device)
            return mapping.get_hp_fragment()

        for n, p in named:
            if p._hp_mapping is None:
                start = end = 0
            else:
                address = p._hp_mapping.lp_fragment_address
                start, end = address.start, address.start + address.numel
            out.append((n, list(p.shape), start, end, lambda p=p: fragment(p)))
        return out
    if engine.zero_optimization_stage() != 0:
        raise RuntimeError(f"ZeRO stage {engine.zero_optimization_stage()} with "
                           f"{type(engine.optimizer).__name__}: no fp32 master fragments were linked "
                           "to the parameters, so the EMA has nothing to follow")
    masters = _zero0_masters(engine)
    for n, p in named:
        start, end = _slice_bounds(p.numel(), rank, world)
        out.append((n, list(p.shape), start, end,
                    lambda p=p, s=start, e=end: masters(p).view(-1)[s:e]))
    return out


def _zero0_masters(engine) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    """ZeRO-0: a function from a module parameter to its full fp32 master weight."""
    opt = engine.optimizer
    if model_dtype(engine) == torch.float32:
        return lambda p: p.data
    if hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 master per group
        def fused(p: torch.nn.Parameter) -> torch.Tensor:
            for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for q in group:
                    if q is p:
                        return flat.narrow(0, offset, p.numel()).view(p.shape)
                    offset += q.numel()
            raise KeyError("parameter not found in the optimizer's groups")
        return fused
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 master per parameter
        def unfused(p: torch.nn.Parameter) -> torch.Tensor:
            for group, masters in zip(opt.fp16_groups, opt.fp32_groups):
                for q, m in zip(group, masters):
                    if q is p:
                        return m.data
            raise KeyError("parameter not found in the optimizer's groups")
        return unfused
    raise RuntimeError(f"ZeRO-0 with {type(opt).__name__} in {model_dtype(engine)}: no fp32 master "
                       "weights found for the EMA")


def weight_views(engine) -> Callable[[], Iterable[tuple[str, torch.Tensor]]]:
    """A function returning the (name, tensor) pairs of the weights this rank keeps an EMA of.

    The tensors are this rank's slices of the fp32 master weights (see `_master_slices`), so
    the EMA averages what the optimizer updates, not its bf16 rounding, at every ZeRO stage;
    each rank keeps only its slice (1/world of the model per rank) and no communication is
    needed. `partition_layout` gives the bounds of every slice.
    """
    slices = _master_slices(engine)
    return lambda: ((name, get()) for name, _, _, _, get in slices)


def partition_layout(engine) -> dict[str, dict[str, Any]]:
    """Per parameter: its full shape and element count, and the [start, end) of the flattened
    parameter that this rank's EMA slice covers (the ranks' slices tile it)."""
    return {name: {"shape": shape, "numel": int(torch.Size(shape).numel()), "start": start, "end": end}
            for name, shape, start, end, _ in _master_slices(engine)}


@torch.no_grad()
def set_master_weights(engine, read: Callable[[str], torch.Tensor]) -> None:
    """Overwrite this rank's fp32 master slices with the full fp32 tensors `read(name)` returns.

    For a run started from given weights in bf16: DeepSpeed builds the masters from the bf16
    module, so without this they would start at the bf16 rounding of the given fp32 weights.
    """
    if is_zero3(engine):
        named = dict(engine.module.named_parameters())
        for name, _, start, end, _ in _master_slices(engine):
            p = named[name]
            local = safe_get_local_fp32_param(p).clone()   # padded partition; may be a device copy
            local.view(-1)[: end - start].copy_(read(name).reshape(-1)[start:end])
            safe_set_local_fp32_param(p, local)
        return
    for name, _, start, end, get in _master_slices(engine):
        get().copy_(read(name).reshape(-1)[start:end])


def save_engine(engine, folder: str, tag: str) -> None:
    """DeepSpeed's part of a checkpoint (model, optimizer, LR schedule), into `folder/tag`."""
    engine.save_checkpoint(folder, tag=tag, save_latest=False)


def load_engine(engine, folder: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}/{tag}")


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
