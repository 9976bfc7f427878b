"""Everything this project reads or changes of DeepSpeed below its documented API, in one file.

DeepSpeed's public API covers training itself: `deepspeed.initialize`, the engine's `backward`,
`step`, `save_checkpoint`, `load_checkpoint`, `get_lr`, `get_global_grad_norm`,
`was_step_applied` and config accessors, and the `deepspeed.utils.safe_*` accessors. Three jobs
need more, and only this file does them:

- the EMA follows the fp32 master weights where the optimizer keeps them: ZeRO 1-2's fragment
  mapping (`param._hp_mapping`), ZeRO-3's partition attributes (`ds_numel`, `ds_shape`), ZeRO-0's
  mixed-precision masters (`fp32_groups_flat`, `fp32_groups`);
- a bare ZeRO-0 optimizer gets the skip of non-finite steps that ZeRO 1-3 have
  (`optimizer.overflow`, which DeepSpeed's engine reads);
- a resume onto another layout (training/engine_reshard.py) re-slices DeepSpeed's files: their
  names and keys, the optimizer wrappers' flat fp32 tensors, the step counters, and the calls
  that relink the module's weights to new masters;
- a CPU rank skips the shared-memory comm op that `deepspeed.init_distributed` would build
  (`skip_shm_comm_op`).

`INTERNALS` names each attribute, method and file key with what it is for. `probe(engine)` and
`probe_checkpoint(engine, folder)` read every one that applies to an engine and raise
DeepSpeedInternalsError naming those a DeepSpeed upgrade moved; tests/test_resume_reshard.py
runs them at every ZeRO stage, fp32 and bf16, and checks that each entry was read at least once
and that no other module of ours touches these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from imagen_train.utils import dist

# Before DeepSpeed loads: it picks its accelerator at import (and warns when it has to guess).
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402,I100
from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param  # noqa: E402

# Optimizer wrapper class -> kind; the kind says where DeepSpeed keeps the fp32 masters, in
# memory and in its files.
OPTIMIZER_KINDS = {"DeepSpeedZeroOptimizer": "zero", "BF16_Optimizer": "zero",
                   "DeepSpeedZeroOptimizer_Stage3": "zero3", "FP16_Optimizer": "fp16",
                   "FP16_UnfusedOptimizer": "fp16-unfused"}
# Where a kind's optimizer file keeps its fp32 masters and its torch optimizer's state.
_FILE_KEYS = {"zero": ("optimizer_state_dict", "single_partition_of_fp32_groups", "base_optimizer_state"),
              "zero3": ("optimizer_state_dict", "fp32_flat_groups", "optimizer_state_dict"),
              "fp16": ("optimizer", "fp32_groups_flat", "optimizer_state_dict"),
              "fp16-unfused": ("optimizer", "fp32_groups", "optimizer_state_dict")}
# DeepSpeed's model-state file: the LR schedule and the step counters (`restore_schedule`).
_MODEL_FILE_KEYS = ("lr_scheduler", "global_steps", "skipped_steps")

# One parameter's fp32 master slice on this rank: (name, full shape, start, end, get), where
# `get()` returns the slice [start, end) of the flattened fp32 master, as a view that the
# optimizer updates in place (read it again after a checkpoint load: DeepSpeed relinks).
MasterSlice = tuple[str, list[int], int, int, Callable[[], torch.Tensor]]


class DeepSpeedInternalsError(RuntimeError):
    """This DeepSpeed lacks an attribute or file key that this module reads."""


# DeepSpeed's CPU shared-memory comm op (deepspeed/ops/op_builder/cpu/comm.py, ShareMemCommBuilder).
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_op() -> None:
    """Keep `deepspeed.init_distributed` on a CPU from building and starting its shared-memory op.

    deepspeed.comm builds it for `inference_all_reduce`, which only DeepSpeed-Inference's
    tensor-parallel layers call; training's collectives go through torch.distributed (gloo). The
    build is a C++ compile of ~20 s (~40 CPU s) on a machine's first run, and the op then maps a
    ~66 MB /dev/shm buffer per rank that it never removes. `build_shm_op` returns None for an op
    that `deepspeed.ops.__compatible_ops__` marks incompatible; that dict is cached in the module,
    so the mark holds for the process.
    """
    compatible = deepspeed.ops.__compatible_ops__
    if SHM_COMM_OP not in compatible:
        raise DeepSpeedInternalsError(_gone([f"deepspeed.ops.__compatible_ops__ has no {SHM_COMM_OP!r} "
                                             f"(skipping the CPU shared-memory comm op)"]))
    compatible[SHM_COMM_OP] = False


def optimizer_kind(engine) -> str:
    """'zero' (ZeRO 1-2), 'zero3', 'fp16' or 'fp16-unfused' (ZeRO-0 in bf16/fp16: one flat fp32
    master per group, or one per parameter) or 'torch' (ZeRO-0 fp32: a bare torch optimizer over
    the module's parameters)."""
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return "torch"
    name = type(engine.optimizer).__name__
    if name not in OPTIMIZER_KINDS:
        raise RuntimeError(f"training/deepspeed_internals.py does not know DeepSpeed's {name}")
    return OPTIMIZER_KINDS[name]


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer that updates the weights, under DeepSpeed's ZeRO or mixed-precision wrapper."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def loss_scale(engine) -> float:
    """The fp16 loss scale (every fp16-capable wrapper promotes its scaler's as `loss_scale`)."""
    return float(engine.optimizer.loss_scale)


def skip_nonfinite_steps(engine) -> None:
    """Give an optimizer without DeepSpeed's overflow check (ZeRO-0 fp32) one.

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


# The fp32 master weights, per ZeRO stage ------------------------------------------------------

def _slice_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    """ZeRO-3's partitioning of a flattened tensor: equal parts of ceil(numel / world)."""
    part = -(-numel // world)
    return min(rank * part, numel), min((rank + 1) * part, numel)


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def master_slices(engine) -> list[MasterSlice]:
    """Where this rank's fp32 master weights are, per trainable parameter.

    ZeRO-3: the local partition of `safe_get_local_fp32_param`, less its padding (equal parts
    of ceil(numel / world)). ZeRO 1-2, fp32 or bf16 (DeepSpeedZeroOptimizer, BF16_Optimizer):
    the fragment of each parameter that falls in this rank's flat fp32 partition; its bounds
    follow DeepSpeed's partitioning of the flattened group, so a rank may hold all, part or
    none of a parameter. ZeRO-0: the fp32 master (the module's own weight in an fp32 run, the
    FP16_Optimizer's copy in a bf16/fp16 run), cut in equal parts over the ranks.
    """
    named, rank, world = _trainable(engine), dist.rank(), dist.world_size()
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return [(n, list(p.ds_shape), *_slice_bounds(p.ds_numel, rank, world),
                 lambda p=p, k=_slice_bounds(p.ds_numel, rank, world):
                 safe_get_local_fp32_param(p).view(-1)[:k[1] - k[0]]) for n, p in named]
    if named and all(hasattr(p, "_hp_mapping") for _, p in named):
        return [(n, list(p.shape), *_fragment_bounds(p), lambda p=p: _fragment(p)) for n, p in named]
    if stage != 0:
        raise RuntimeError(f"ZeRO stage {stage} with {type(engine.optimizer).__name__}: no fp32 master "
                           "fragments were linked to the parameters, so the EMA has nothing to follow")
    masters = zero0_masters(engine)
    out: list[MasterSlice] = []
    for n, p in named:
        start, end = _slice_bounds(p.numel(), rank, world)
        out.append((n, list(p.shape), start, end, lambda p=p, s=start, e=end: masters(p).view(-1)[s:e]))
    return out


def _fragment_bounds(p: torch.nn.Parameter) -> tuple[int, int]:
    """ZeRO 1-2: the [start, end) of flattened `p` in this rank's partition (0, 0: none of it)."""
    if p._hp_mapping is None:
        return 0, 0
    address = p._hp_mapping.lp_fragment_address
    return address.start, address.start + address.numel


def _fragment(p: torch.nn.Parameter) -> torch.Tensor:
    """ZeRO 1-2: this rank's fp32 master fragment of `p`, a view into its flat partition."""
    if p._hp_mapping is None:  # no element of p in this rank's partition
        return torch.zeros(0, dtype=torch.float32, device=p.device)
    return p._hp_mapping.get_hp_fragment()


def zero0_masters(engine) -> Callable[[torch.nn.Parameter], torch.Tensor]:
    """ZeRO-0: a function from a module parameter to its full fp32 master weight."""
    opt = engine.optimizer
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
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
    raise RuntimeError(f"ZeRO-0 with {type(opt).__name__} in mixed precision: no fp32 master weights "
                       "found for the EMA")


@torch.no_grad()
def set_master_weights(engine, read: Callable[[str], torch.Tensor]) -> None:
    """Overwrite this rank's fp32 master slices with the full fp32 tensors `read(name)` returns."""
    if engine.zero_optimization_stage() == 3:
        named = dict(engine.module.named_parameters())
        for name, _, start, end, _ in master_slices(engine):
            p = named[name]
            local = safe_get_local_fp32_param(p).clone()   # padded partition; may be a device copy
            local.view(-1)[: end - start].copy_(read(name).reshape(-1)[start:end])
            safe_set_local_fp32_param(p, local)
        return
    for name, _, start, end, get in master_slices(engine):
        get().copy_(read(name).reshape(-1)[start:end])


# What a re-slice reads and writes (training/engine_reshard.py) ----------------------------------

def fp32_flats(engine) -> list[torch.Tensor]:
    """The fp32 tensors the torch optimizer steps, in its state_dict's order (ZeRO-0 fp32: the
    module's parameters; otherwise flat partitions)."""
    if engine.zero_optimization_stage() == 3:  # its torch optimizer's param_groups are emptied outside `step`
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [p for group in torch_optimizer(engine).param_groups for p in group["params"]]


def rank_files(engine) -> dict[str, str]:
    """This rank's DeepSpeed files in a checkpoint: 'optimizer' (its optimizer state) and 'model'
    (one holding the LR schedule and step counters)."""
    model = Path(engine._get_ckpt_name("", "")).name
    if engine.zero_optimization_stage() == 0:
        return {"optimizer": model, "model": model}
    return {"optimizer": Path(engine._get_zero_ckpt_name("", "")).name, "model": model}


def saved_optimizer(kind: str, saved: dict[str, Any]) -> tuple[Callable[[int, str], torch.Tensor], dict]:
    """From a DeepSpeed file of optimizer `kind`: (masters(flat index, name) -> the saved fp32
    tensor, the torch optimizer's state by flat index)."""
    if kind == "torch":
        return (lambda _, name: saved["module"][name]), saved["optimizer"]["state"]
    outer, masters_key, state_key = _FILE_KEYS[kind]
    inner = saved[outer]
    masters = inner[masters_key]
    if kind == "fp16-unfused":
        masters = [master for group in masters for master in group]
    state = inner[state_key]
    if isinstance(state, list):  # zero_optimization.elastic_checkpoint: one dict per group
        return (lambda index, _: masters[index]), dict(enumerate(state))
    return (lambda index, _: masters[index]), state["state"]


def relink_masters(engine) -> None:
    """After the masters and optimizer state were written directly: link ZeRO 1-2's parameters
    to the new state now, as its first step would."""
    if optimizer_kind(engine) == "zero":
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def restore_schedule(engine, model_file: dict[str, Any]) -> None:
    """The LR schedule and step counters from DeepSpeed's model-state file, as its own load does;
    the optimizer's LR is set to the restored schedule's (LambdaLR sets it only at its next step)."""
    engine.lr_scheduler.load_state_dict(model_file["lr_scheduler"])
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = model_file["global_steps"]
    engine.global_samples = model_file.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_file["skipped_steps"]


@torch.no_grad()
def refresh_low_precision(engine) -> None:
    """Make the module's weights follow fp32 masters that were written directly (every rank)."""
    kind = optimizer_kind(engine)
    if kind == "zero":
        engine.optimizer.update_lp_params()  # this rank's partition from its masters, then all-gathered
    elif kind == "zero3":
        engine.optimizer.checkpoint_event_prologue()  # release the gathered (persistent) parameters
        for _, p in _trainable(engine):
            local = safe_get_local_fp32_param(p).reshape(-1)
            p.ds_tensor.data.view(-1).copy_(local[: p.ds_tensor.numel()])
        engine.optimizer.checkpoint_event_epilogue()  # and gather them again, from the new partitions
    elif kind.startswith("fp16"):
        masters = zero0_masters(engine)
        for _, p in _trainable(engine):
            p.data.copy_(masters(p))


# The list, and the probes the tests run ---------------------------------------------------------

@dataclass(frozen=True)
class Internal:
    """One thing this module reads of DeepSpeed below its API: whether it `applies` to an engine,
    and a `read` of it that raises if it moved. `name` is `owner.attribute[, attribute...]`."""

    name: str
    used_for: str
    applies: Callable[[Any], bool]
    read: Callable[[Any], Any]


def _param(engine, mapped: bool = False) -> torch.nn.Parameter:
    named = _trainable(engine)
    if mapped:  # one this rank holds part of (every rank holds part of some parameter)
        return next(p for _, p in named if getattr(p, "_hp_mapping", None) is not None)
    return named[0][1]


def _any(_: Any) -> bool:
    return True


def _kind(*kinds: str) -> Callable[[Any], bool]:
    return lambda engine: optimizer_kind(engine) in kinds


def _wrapper(*names: str) -> Callable[[Any], bool]:
    return lambda engine: type(engine.optimizer).__name__ in names


INTERNALS = [
    Internal("type(optimizer).__name__", "which wrapper DeepSpeed chose, so where its masters are "
             "(OPTIMIZER_KINDS)", lambda e: not isinstance(e.optimizer, torch.optim.Optimizer),
             lambda e: OPTIMIZER_KINDS[type(e.optimizer).__name__]),
    Internal("optimizer.optimizer", "the torch optimizer under a ZeRO or mixed-precision wrapper "
             "(its state is what a re-slice fills; its kernel flags are logged)",
             lambda e: optimizer_kind(e) != "torch", lambda e: e.optimizer.optimizer.param_groups),
    Internal("optimizer.overflow", "ZeRO 1-3 and the mixed-precision wrappers flag a skipped step "
             "here and the engine reads it (ZeRO-0 fp32 gets ours: skip_nonfinite_steps)",
             _any, lambda e: e.optimizer.overflow),
    Internal("optimizer.loss_scale", "the fp16 loss scale, for the log (fp16-capable wrappers)",
             _wrapper("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "FP16_Optimizer",
                      "FP16_UnfusedOptimizer"), lambda e: (e.optimizer.loss_scale,)),
    Internal("param._hp_mapping, lp_fragment_address, get_hp_fragment", "ZeRO 1-2: where a parameter's "
             "fp32 master fragment is (its bounds, and a view of it)", _kind("zero"),
             lambda e: (_fragment_bounds(_param(e, True)), _fragment(_param(e, True)))),
    Internal("param.ds_shape, param.ds_numel", "ZeRO-3: a partitioned parameter's full shape and size",
             _kind("zero3"), lambda e: (_param(e).ds_shape, _param(e).ds_numel)),
    Internal("param.ds_tensor", "ZeRO-3: the local partition the module's weight is gathered from",
             _kind("zero3"), lambda e: _param(e).ds_tensor.numel()),
    Internal("optimizer.fp16_groups, fp32_groups_flat", "ZeRO-0 bf16/fp16 (FP16_Optimizer): the flat "
             "fp32 masters", _kind("fp16"), lambda e: zero0_masters(e)(_param(e))),
    Internal("optimizer.fp16_groups, fp32_groups", "ZeRO-0 bf16/fp16 (FP16_UnfusedOptimizer): the "
             "fp32 masters", _kind("fp16-unfused"), lambda e: zero0_masters(e)(_param(e))),
    Internal("optimizer.fp32_partitioned_groups_flat", "ZeRO-3: the flat fp32 partitions the torch "
             "optimizer steps", _kind("zero3"), lambda e: fp32_flats(e)[0].numel()),
    Internal("engine._get_ckpt_name", "the file of the model state, LR schedule and counters",
             _any, lambda e: e._get_ckpt_name("", "")),
    Internal("engine._get_zero_ckpt_name", "ZeRO 1-3: this rank's optimizer file",
             lambda e: e.zero_optimization_stage() > 0, lambda e: e._get_zero_ckpt_name("", "")),
    Internal("engine.global_steps, global_samples, skipped_steps", "the step counters a re-slice "
             "restores", _any, lambda e: (e.global_steps, e.global_samples, e.skipped_steps)),
    Internal("optimizer._lazy_init_hp_params_optimizer_state", "ZeRO 1-2: relink the parameters to "
             "new optimizer state", _kind("zero"),
             lambda e: e.optimizer._lazy_init_hp_params_optimizer_state),
    Internal("optimizer.update_lp_params", "ZeRO 1-2: the module's weights from new masters",
             _kind("zero"), lambda e: e.optimizer.update_lp_params),
    Internal("optimizer.checkpoint_event_prologue, checkpoint_event_epilogue", "ZeRO-3: release and "
             "re-gather the persistent parameters around a direct write", _kind("zero3"),
             lambda e: (e.optimizer.checkpoint_event_prologue, e.optimizer.checkpoint_event_epilogue)),
]


def probe(engine) -> list[str]:
    """Read every entry of INTERNALS that applies to `engine`; returns their names, or raises
    DeepSpeedInternalsError naming every one that is gone."""
    read, missing = [], []
    for item in INTERNALS:
        if not item.applies(engine):
            continue
        try:
            if item.read(engine) is None:
                raise AttributeError("it is None")
            read.append(item.name)
        except (AttributeError, KeyError, StopIteration, TypeError) as err:
            missing.append(f"{item.name} ({item.used_for}): {type(err).__name__}: {err}")
    if missing:
        raise DeepSpeedInternalsError(_gone(missing))
    return read


def file_keys(kind: str) -> list[tuple[str, tuple[str, ...]]]:
    """(file, key path) of everything `saved_optimizer` and `restore_schedule` read of the files
    an optimizer of `kind` writes; file is 'optimizer' or 'model' (`rank_files`)."""
    if kind == "torch":
        wanted = [("optimizer", ("module",)), ("optimizer", ("optimizer", "state"))]
    else:
        outer, masters, state = _FILE_KEYS[kind]
        wanted = [("optimizer", (outer, masters)), ("optimizer", (outer, state))]
    return wanted + [("model", (key,)) for key in _MODEL_FILE_KEYS]


def probe_checkpoint(engine, folder: Path) -> list[str]:
    """Read the keys of `file_keys` out of this rank's files in `folder` (a checkpoint this
    engine saved); returns them, or raises DeepSpeedInternalsError naming the missing ones."""
    files = rank_files(engine)
    # DeepSpeed's own files hold pickled objects (its own loader uses weights_only=False too).
    loaded = {name: torch.load(folder / files[name], map_location="cpu", weights_only=False)
              for name in ("optimizer", "model")}
    read, missing = [], []
    for file, path in file_keys(optimizer_kind(engine)):
        node: Any = loaded[file]
        try:
            for key in path:
                node = node[key]
            read.append(f"{file} file: {'/'.join(path)}")
        except (KeyError, TypeError):
            missing.append(f"{files[file]} has no {'/'.join(path)}")
    if missing:
        raise DeepSpeedInternalsError(_gone(missing))
    return read


def _gone(missing: list[str]) -> str:
    return (f"DeepSpeed {deepspeed.__version__} moved what training/deepspeed_internals.py reads: "
            + "; ".join(missing))
