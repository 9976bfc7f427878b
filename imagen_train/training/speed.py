"""Speed options applied to the network from outside the model code: channels_last activations,
torch.compile, and where the fused GroupNorm -> FiLM -> SiLU function runs (torchtitan's split:
the model is written for one device, the trainer decides how it runs). The trainer and
bench/train_step.py call the network through `network_caller`, so the benchmark times the same
step the trainer takes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from imagen_train.config import Config, ConfigError, TrainingConfig
from imagen_train.diffusion.caller import NetworkCaller
from imagen_train.models import build_model
from imagen_train.models.layers import OutputHead, ResBlock
from imagen_train.models.norm_act import check_fused_mode
from imagen_train.utils import dist


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


def set_fused_norm_act(net: nn.Module, mode: str) -> int:
    """Where every ResBlock and output head of `net` runs its GroupNorm -> FiLM -> SiLU regions as
    one autograd function (models/norm_act.py's FUSED_MODES); returns how many modules it set.

    An option of each module, not of the process: two networks in one process (a benchmark's
    before and after) can run the region differently.
    """
    check_fused_mode(mode)
    modules = [m for m in net.modules() if isinstance(m, (ResBlock, OutputHead))]
    for module in modules:
        module.fused_norm_act = mode
    return len(modules)


def check_compile(device: Optional[str] = None) -> None:
    """Raise ConfigError('training.compile') unless torch.compile builds and runs a kernel here.

    Inductor compiles lazily, at the first call: without this check a missing C++ compiler (CPU)
    or Triton (GPU) would surface as a long backend traceback in the middle of the first step.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def probe(x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * 2.0

    try:
        torch.compile(probe, dynamic=False)(torch.randn(8, device=device))
    except Exception as err:  # inductor raises many types (InductorError, BackendCompilerFailed, ...)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError("training.compile", "false, or a machine where torch.compile's inductor backend "
                          f"works on {device} (a C++ compiler on a CPU, Triton on a GPU)",
                          f"true ({type(err).__name__}: {first})") from None


def compile_regions(net: nn.Module, backend: str = "inductor") -> int:
    """torch.compile, in place, every block the network runs in turn; returns how many.

    The blocks are the entries of the network's ModuleLists (a ResBlock, an attention layer, a
    down- or upsampling step): what `run_block` calls. Compiled in place (`nn.Module.compile`),
    parameter names, checkpoints and the EMA are unchanged. Blocks of the same class and shapes
    reuse one compiled graph, so a 2B network compiles about as fast as a tiny one.
    """
    blocks = [child for module in net.modules() if isinstance(module, nn.ModuleList)
              for child in module if not isinstance(child, nn.ModuleList)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def apply_compile(net: nn.Module, training: TrainingConfig) -> None:
    """`training.compile` in `training.compile_mode`, applied in place to `net`."""
    if not training.compile:
        return
    if training.compile_mode == "regional":
        compile_regions(net)
    else:
        net.compile()


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
