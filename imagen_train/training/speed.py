"""The training config's speed options, applied to the network from outside the model code
(imagen_train/speedups.py holds the options themselves; sampling uses them too). The trainer
(engine.create_engine) and bench/train_step.py apply them through `apply_model_options` and
`apply_compile`, and call the network through `network_caller`, so the benchmark times the step
the trainer takes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imagen_train import speedups
from imagen_train.config import Config, TrainingConfig
from imagen_train.diffusion.caller import NetworkCaller
from imagen_train.models import build_model
from imagen_train.utils import dist

# One compile check for the trainer's preflight, the bench and sampling (speedups.check_compile).
check_compile = speedups.check_compile


def memory_format(training: TrainingConfig) -> torch.memory_format:
    """The memory format the image inputs are given in (`training.channels_last`).

    Only the inputs are converted: convolution kernels (oneDNN on a CPU, cuDNN on a GPU) pick
    channels_last when their input is, so every activation and its gradient follow, while the
    weights stay contiguous. DeepSpeed cannot take channels_last parameters (its broadcast views
    each one as bytes, which needs a unit last stride) and ZeRO 1-2 flatten them anyway.
    """
    return torch.channels_last if training.channels_last else torch.contiguous_format


def network_caller(net: Callable, training: TrainingConfig, dtype: torch.dtype) -> NetworkCaller:
    """`net` as the trainer calls it: inputs in the training `dtype` and in `memory_format(training)`,
    noise levels in float32, output in x's dtype (float32 in the loss)."""
    return NetworkCaller(net, dtype=dtype, memory_format=memory_format(training))


def apply_model_options(net: nn.Module, cfg: Config) -> None:
    """Everything but compile, in place: activation checkpointing (`model.activation_checkpointing`),
    the fused GroupNorm -> FiLM -> SiLU mode (`training.fused_norm`), and cuDNN's algorithm search
    (`training.cudnn_benchmark`, process-wide, GPU only)."""
    speedups.apply_activation_checkpointing(net, cfg.model.activation_checkpointing)
    speedups.apply_fused_norm(net, cfg.training.fused_norm)
    speedups.set_cudnn_benchmark(cfg.training.cudnn_benchmark)


def apply_compile(net: nn.Module, training: TrainingConfig, log: Callable[[str], None] = dist.print0,
                  backend: str = "inductor") -> Optional[speedups.CompileState]:
    """`training.compile` in `training.compile_mode`, in place (after `apply_model_options`); None when
    off. `backend`: inductor, or eager (dynamo alone: tests and CPU rehearsals)."""
    if not training.compile:
        return None
    return speedups.apply_compile(net, training.compile_mode, backend=backend,
                                  cache_dir=training.compile_cache_dir, log=log)


def apply_speed_options(net: nn.Module, cfg: Config) -> Optional[speedups.CompileState]:
    """All of the config's speed options on the network the trainer steps, in their order."""
    apply_model_options(net, cfg)
    return apply_compile(net, cfg.training)


def count_flops_per_sample(cfg: Config) -> Optional[float]:
    """Forward FLOPs of one sample, counted on a meta-device copy of the network."""
    try:
        with torch.device("meta"):
            net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution)
            res, L = cfg.train_resolution, cfg.text.max_length
            args = [torch.zeros(1, 3, res, res), torch.zeros(1), torch.zeros(1, L, cfg.text.embed_dim),
                    torch.ones(1, L, dtype=torch.bool)]
            if cfg.lowres_resolution:
                args += [torch.zeros(1, 3, cfg.lowres_resolution, cfg.lowres_resolution), torch.zeros(1)]
            counter = FlopCounterMode(display=False)
            with counter:
                net(*args)
        return float(counter.get_total_flops())
    except Exception as err:  # counting is best effort; training must not depend on it
        dist.print0(f"[train] could not count FLOPs ({type(err).__name__}: {err})")
        return None
