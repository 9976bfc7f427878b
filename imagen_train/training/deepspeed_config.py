"""DeepSpeed's JSON config, built from ours: batch sizes, precision, ZeRO and the optimizer have one
source of truth (the run's Config), and `training.deepspeed_extra` is merged over the result.

Plain dictionaries only: nothing here imports DeepSpeed (training/engine.py hands the result to
`deepspeed.initialize`).
"""

from __future__ import annotations

from typing import Any

from imagen_train.config import Config, ConfigError, TrainingConfig


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

def compiled_optimizer_op(cfg: Config) -> str | None:
    """The DeepSpeed op builder the run's optimizer needs built, or None (torch's AdamW)."""
    if cfg.training.offload_optimizer:
        return "CPUAdamBuilder"
    if cfg.optim.implementation == "deepspeed-fused":
        return "FusedAdamBuilder"
    return None


def _merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, dictionaries key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
