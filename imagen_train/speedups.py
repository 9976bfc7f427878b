"""Speed options applied to a network from outside its code, torchtitan style: the UNets are plain
single-device PyTorch, and whoever runs them (the trainer through training/speed.py, bench/, the
cascade) decides here how they run. Each option is set on one network in place (parameter names,
checkpoints, the EMA and exports are unchanged) and can be undone, so a benchmark can train two
copies side by side, one with the option and one without.

- `apply_activation_checkpointing`: recompute each block in backward.
- `apply_fused_norm`: where the GroupNorm -> FiLM -> SiLU regions run as one autograd function
  (models/norm_act.py).
- `apply_groupnorm_upcast`: the old GroupNorm path that copies a half-precision input to float32
  first (a benchmark baseline; the default normalises it in place with float32 statistics).
- `set_cudnn_benchmark`: cuDNN's per-shape algorithm search.
- `apply_compile`: torch.compile per block ("regional") or of the whole network, with a fallback
  to eager execution if the compiler fails, and a persistent inductor cache (`compile_cache_dir`).
- `CUDAGraphCall`: a network call replayed from CUDA graphs captured per input shape (sampling at
  small batch, where launching ~700 kernels per call costs more than their arithmetic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from imagen_train.config_errors import ConfigError
from imagen_train.models.layers import GroupNorm32, OutputHead, ResBlock
from imagen_train.models.norm_act import check_fused_mode

COMPILE_MODES = ("regional", "whole")
# Extra dynamo cache entries per code object beyond the network's distinct blocks: a second batch
# size (the last batch of an evaluation, guidance's B and 2B) and slack for what we did not foresee.
RECOMPILE_MARGIN = 8


def blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks the network runs in turn: the entries of its ModuleLists (a ResBlock, an attention
    layer, a down- or upsampling step). Each maps (x, emb, text, text_mask) -> x (models/layers.py)."""
    return [child for module in net.modules() if isinstance(module, nn.ModuleList)
            for child in module if not isinstance(child, nn.ModuleList)]


# ----------------------------------------------------------------------------------------------
# Activation checkpointing, GroupNorm options, cuDNN.

class _Checkpointed:
    """A block's forward recomputed in backward while training with gradients on, its own otherwise."""

    def __init__(self, block: nn.Module):
        self.block, self.forward = block, type(block).forward.__get__(block)

    def __call__(self, *args, **kwargs):
        if self.block.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def apply_activation_checkpointing(net: nn.Module, enabled: bool = True) -> int:
    """Recompute every block of `net` in backward (or stop, `enabled=False`); returns how many.

    Less activation memory for about one more forward pass. Applied before `apply_compile`, whose
    compiled blocks then hold the checkpoint (torch.compile traces it).
    """
    found = blocks(net)
    for block in found:
        current = block.__dict__.get("forward")
        if isinstance(current, _CompiledCall):
            raise RuntimeError("activation checkpointing is applied before apply_compile, not after")
        if enabled and not isinstance(current, _Checkpointed):
            block.forward = _Checkpointed(block)
        elif not enabled and isinstance(current, _Checkpointed):
            del block.forward
    return len(found)


def apply_fused_norm(net: nn.Module, mode: str) -> int:
    """Where every ResBlock and output head of `net` runs its GroupNorm -> FiLM -> SiLU regions as one
    autograd function (norm_act.FUSED_MODES; the modules' own default is "never"); returns how many."""
    check_fused_mode(mode)
    modules = [m for m in net.modules() if isinstance(m, (ResBlock, OutputHead))]
    for module in modules:
        module.fused_norm_act = mode
    return len(modules)


def apply_groupnorm_upcast(net: nn.Module, enabled: bool) -> int:
    """Make every GroupNorm32 of `net` copy a half-precision input to float32 before normalising
    (`enabled`), as it did before, or normalise it as it is; returns how many."""
    norms = [m for m in net.modules() if isinstance(m, GroupNorm32)]
    for norm in norms:
        norm.upcast_input = enabled
    return len(norms)


def set_cudnn_benchmark(enabled: bool) -> None:
    """cuDNN times its convolution algorithms once per new shape and keeps the fastest (process-wide;
    nothing on a CPU). The UNets' shapes are fixed per stage, so the search is paid once."""
    torch.backends.cudnn.benchmark = enabled


# ----------------------------------------------------------------------------------------------
# torch.compile.

def compile_cache_dir(configured: Optional[str] = None) -> str:
    """Where inductor keeps its compiled graphs and kernels between runs: `configured`, else the
    TORCHINDUCTOR_CACHE_DIR variable, else ~/.cache/imagen_train/inductor (under XDG_CACHE_HOME).

    Inductor's own default is /tmp/torchinductor_<user>, which a reboot or a fresh node empties;
    inductor writes that default into the variable when it first looks, so it counts as unset.
    """
    if configured:
        return str(Path(configured).expanduser())
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Imported here, not at the top: it loads all of dynamo (~0.9 s of CPU), which every training
    # rank and test process would otherwise pay at import whether it compiles or not.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if given and given != default_cache_dir():
        return given
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "imagen_train" / "inductor")


def check_compile(device: Optional[str] = None, key: str = "training.compile") -> None:
    """Raise ConfigError(`key`) unless torch.compile builds and runs a forward and backward here.

    Inductor compiles lazily, at the first call: without this check a missing C++ compiler (CPU)
    or Triton (GPU) would surface as a long backend traceback in the middle of the first step.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def probe(x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * 2.0

    try:
        x = torch.randn(8, device=device, requires_grad=True)
        torch.compile(probe, dynamic=False)(x).sum().backward()
    except Exception as err:  # inductor raises many types (InductorError, BackendCompilerFailed, ...)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(key, "false, or a machine where torch.compile's inductor backend works on "
                          f"{device} (a C++ compiler on a CPU, Triton on a GPU)",
                          f"true ({type(err).__name__}: {first})") from None


def is_compile_error(err: BaseException) -> bool:
    """Whether `err` comes from dynamo or inductor building code (not from running it: an
    out-of-memory error or a shape error in our code is raised as it is)."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or type(err).__name__ in (
        "BackendCompilerFailed", "InductorError")


@dataclass
class CompileState:
    """What `apply_compile` did to one network, shared by its compiled calls."""

    mode: str
    backend: str
    calls: list = field(default_factory=list)   # the _CompiledCall objects, to undo them
    groups: int = 0                              # distinct (block class, parameter shapes)
    cache_dir: str = ""
    failed: Optional[str] = None                 # the error that made it fall back to eager
    log: Callable[[str], None] = print

    def fall_back(self, err: BaseException) -> None:
        """Run eager from now on; say so once."""
        if self.failed is None:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            self.failed = f"{type(err).__name__}: {' '.join(lines[:2])[:300]}"  # dynamo's cause is on line 2
            self.log(f"[compile] torch.compile failed ({self.failed}); running eager from here on")


class _CompiledCall:
    """A module's forward through torch.compile, its eager forward after a compile failure.

    Regional blocks take (x, emb, text, text_mask): the text length varies from batch to batch
    (text.pad_to_longest), so it is marked dynamic before each call, outside the compiled code;
    every other size stays static, one graph per block class and shape.
    """

    def __init__(self, eager: Callable, compiled: Callable, state: CompileState, text_args: bool):
        self.eager, self.compiled, self.state, self.text_args = eager, compiled, state, text_args

    def __call__(self, *args, **kwargs):
        if self.state.failed is not None:
            return self.eager(*args, **kwargs)
        if self.text_args:
            for t in args[2:4]:
                if isinstance(t, Tensor) and t.dim() >= 2:
                    torch._dynamo.maybe_mark_dynamic(t, 1)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:
            if not is_compile_error(err):
                raise
            self.state.fall_back(err)
            return self.eager(*args, **kwargs)


def _signature(block: nn.Module) -> tuple:
    return type(block).__name__, tuple(tuple(p.shape) for p in block.parameters())


def apply_compile(net: nn.Module, mode: str = "regional", backend: str = "inductor",
                  cache_dir: Optional[str] = None, log: Callable[[str], None] = print) -> CompileState:
    """torch.compile `net` in place: each block ("regional") or the whole forward ("whole").

    Regional: blocks of one class and parameter shapes share a compiled graph (their parameters
    are graph inputs), so compile time follows the distinct blocks, not their number. Those graphs
    all hang off a few code objects (a class's `forward`), and dynamo keeps 8 per code object by
    default, after which it silently runs the rest eagerly; the limit is raised here to the
    network's distinct blocks plus a margin, so every block compiles. Sizes are static except the
    text length (see _CompiledCall). Backward graphs are lowered with the forward ones, so that a
    compiler failure shows at the first forward, where it falls back to eager with one log line.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    state = CompileState(mode, backend, cache_dir=compile_cache_dir(cache_dir), log=log)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = state.cache_dir  # read when inductor first needs it
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    targets = blocks(net) if mode == "regional" else [net]
    state.groups = len({_signature(m) for m in targets})
    limit = 2 * state.groups + RECOMPILE_MARGIN
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, limit)
    for module in targets:
        eager = module.__dict__.get("forward") or type(module).forward.__get__(module)
        if isinstance(eager, _CompiledCall):
            raise RuntimeError(f"{type(module).__name__} is compiled already")
        compiled = torch.compile(eager, backend=backend, dynamic=False if mode == "regional" else None)
        call = _CompiledCall(eager, compiled, state, text_args=mode == "regional")
        module.forward = call
        state.calls.append((module, eager))
    log(f"[compile] {mode}: {len(targets)} module(s) in {state.groups} distinct shape(s), backend "
        f"{getattr(backend, '__name__', backend)}, cache {state.cache_dir}")
    return state


def remove_compile(state: CompileState) -> None:
    """Undo `apply_compile`: every module runs the forward it had before."""
    for module, eager in state.calls:
        if isinstance(eager, _Checkpointed):
            module.forward = eager
        else:
            del module.forward
    state.calls.clear()


def compile_counters() -> dict[str, Any]:
    """Dynamo's counts so far in this process: frames compiled, graphs, graph breaks, recompiles
    refused at the limit (torch._dynamo.utils.counters)."""
    counters = torch._dynamo.utils.counters
    limit_hits = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower()
                     or "cache_size_limit" in reason.lower())
    return {"frames_ok": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()), "recompile_limit_hits": limit_hits}


# ----------------------------------------------------------------------------------------------
# CUDA graphs for a network call.

@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: list          # the static input tensors the graph reads (None where the argument was None)
    output: Tensor        # the static output the graph writes


def _capture_cuda(fn: Callable[..., Tensor], static: list, pool: Any, warmup_calls: int) -> tuple[Callable, Tensor]:
    """Capture `fn(*static)` into a CUDA graph, after warm-up calls on a side stream (cuDNN's
    algorithm search and the allocator's first requests must not land in the graph)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(*static)
    return graph.replay, output


class CUDAGraphCall:
    """`net(*args)` replayed from a CUDA graph captured at the first call of each input signature.

    For sampling at small batch: one call of a 2B network launches ~700 kernels, whose launch
    cost can exceed their arithmetic at batch 1-2. A graph records them once and replays them in
    one launch. Each call copies its tensors into the graph's static inputs (same shapes and
    dtypes) and returns a copy of the static output, which the next replay overwrites. Graphs of
    different signatures (guidance's 2B and B batches) share one memory pool. No gradients: for
    inference only. `capture` is for tests (a CPU stand-in for `_capture_cuda`).
    """

    def __init__(self, net: Callable[..., Tensor], warmup_calls: int = 2,
                 capture: Optional[Callable[..., tuple[Callable, Tensor]]] = None):
        self.net, self.warmup_calls = net, warmup_calls
        self._capture = capture or _capture_cuda
        self._pool = torch.cuda.graph_pool_handle() if capture is None else None
        self.graphs: dict[tuple, _Graph] = {}

    def __call__(self, *args, **kwargs) -> Tensor:
        names = tuple(sorted(kwargs))  # the network's optional arguments (lowres, lowres_noise_cond)
        flat = args + tuple(kwargs[name] for name in names)
        key = (len(args), names) + tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else ("value", a)
                                         for a in flat)
        graph = self.graphs.get(key)
        if graph is None:
            positional = len(args)

            def call(*f):
                return self.net(*f[:positional], **dict(zip(names, f[positional:])))

            static = [a.clone() if isinstance(a, Tensor) else a for a in flat]
            with torch.no_grad():
                replay, output = self._capture(call, static, self._pool, self.warmup_calls)
            graph = self.graphs[key] = _Graph(replay, static, output)
        for target, a in zip(graph.inputs, flat):
            if isinstance(target, Tensor):
                target.copy_(a)
        graph.replay()
        return graph.output.clone()


__all__ = ["COMPILE_MODES", "CUDAGraphCall", "CompileState", "apply_activation_checkpointing", "apply_compile",
           "apply_fused_norm", "apply_groupnorm_upcast", "blocks", "check_compile", "compile_cache_dir",
           "compile_counters", "is_compile_error", "remove_compile", "set_cudnn_benchmark"]
