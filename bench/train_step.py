"""Training-step benchmark: step time, samples/s, peak memory, FLOPs and MFU of one stage's network,
optionally side by side with a matched diffusers peer (DeepFloyd IF's stage-I UNet family).

    python bench/train_step.py --config configs/base64-35m.yaml [--precision fp32|bf16] [--batch N]
        [--steps N] [--warmup N] [--rounds R] [--set key=value ...] [--peer] [--baseline NAME] [--json OUT]

A step is what the trainer does per micro batch on one rank: the stage's diffusion loss
(`training_loss`: noise level, noising, preconditioning, network forward, weighted L2) on a
batch of synthetic tensors of the stage's shapes (image, T5 embeddings with padding, and for the
SR stages the low-res image), backward, gradient clipping at `training.grad_clip`, and AdamW.
The network is built from the config as training builds it and is called through the trainer's
own `speed.network_caller` (dtype, memory format). Precision as in training under DeepSpeed: fp32, or
bf16 weights and gradients with fp32 master weights and AdamW states (DeepSpeed's bf16 mode).

Single device, no DeepSpeed: ZeRO only partitions optimizer state and gradients across ranks
and overlaps their communication, so it does not change one device's arithmetic; what it adds
(bucketing, all-reduce, the EMA update) shows in the trainer's logged perf/samples_per_s. Data
loading is not part of the step either (the batch already sits on the device); its overlap with
compute (`data.num_workers`, `data.prefetch_factor`, `data.pin_memory`) is measured by
bench/data_loader.py and by the trainer's perf/data_wait_s.

Reported per network: median step time and samples/s over the timed steps; peak memory = the
bytes of its persistent state (weights, fp32 masters, AdamW moments, buffers; counted exactly)
plus the largest growth during its steps (activations, gradients, temporaries: on a GPU
max_memory_allocated above the level at the start of a round; on a CPU the kernel's RSS
high-water mark VmHWM, reset through /proc/self/clear_refs after malloc_trim at the start of a
round, above the RSS then); model FLOPs per sample, counted by torch.utils.flop_counter on the
real module over one forward + backward of the loss (matmuls, convolutions and attention, whose
backward torch counts with the flash kernels' recomputation of the scores; without activation-
checkpointing recomputation, i.e. model FLOPs, not hardware FLOPs); achieved TFLOP/s;
and MFU against a peak measured in the same run: a square matmul (n = 2048 on a CPU, 8192 on a
GPU) in the same dtype, median over reps spread across the rounds. On a GPU the H100 SXM bf16
dense datasheet figure (989 TFLOP/s) is printed for reference; there fp32 MFU means little, since
torch runs fp32 convolutions in TF32 by default but not fp32 matmuls (the peak).

--peer adds diffusers' UNet2DConditionModel set up like IF stage I (bench/if_peer.py), sized to
our parameter count within 5 % (base64 configs only), trained on the same batch with the same
loss, precision, optimizer and speed options; the two alternate A/B/A/B in `--rounds` rounds in
one process, and the ratios ours/peer of samples/s and of peak memory are reported. Each round
starts with `--settle` untimed steps (default 1): memory is measured over them, time is not (see
`timed_steps`).

Speed options, all through --set: training.channels_last=true, training.compile=true (both
applied to the peer as well: the peer, a foreign module, compiles whole), training.fused_norm,
training.cudnn_benchmark, model.activation_checkpointing=true (diffusers' gradient checkpointing
for the peer). Attention always goes through F.scaled_dot_product_attention
(flash kernels on a GPU).

--baseline NAME (repeatable) also trains a copy of our network with one speed change undone or
made (config overrides of that copy, a model option set on it, or a context around its steps),
all in the same A/B/C/... rounds, and reports ours / baseline for each:
- `composed-norm`: the GroupNorm -> FiLM -> SiLU regions as separate PyTorch ops instead of
  imagen_train.models.norm_act's fused function (`training.fused_norm=never`);
- `fused-norm-everywhere`: the fused function on every map (`training.fused_norm=always`; the
  default "auto" takes it only on large channels_last fp32 CPU maps), so ours / baseline < 1 says
  it would pay on this device too;
- `groupnorm-fp32-copy`: GroupNorm copying a bf16/fp16 input to float32 first, as it used to
  (speedups.apply_groupnorm_upcast), against normalising it in place with float32 statistics;
- `no-cudnn-benchmark`: cuDNN without its per-shape algorithm search (`training.cudnn_benchmark`);
- `eager`: without torch.compile (`training.compile=false`; with --set training.compile=true
  this measures compile's speed-up, and `first_step_s` in the JSON its compile time);
- `math-attention`: SDPA's reference (math) kernel instead of the flash kernels;
- `unmasked-attention`: every attention mask dropped (numerics differ: the padding is attended),
  so ours / baseline < 1 measures what the masks cost (on a GPU a boolean mask keeps SDPA off its
  flash kernel): the most a mask-free layout could gain;
- `set:KEY=VALUE[,KEY=VALUE]`: any config overrides, e.g. `set:training.channels_last=true`.
The speed options reach every copy through the trainer's own functions (training/speed.py:
`apply_model_options`, `apply_compile`), so a copy runs as the trainer would with its config.
With --json, a first version of the file (`"partial": true`) is written once every network is
compiled and warm (first-step and compile figures), so a run cut short still leaves those.

--threads sets torch's CPU threads (default: torch's choice, one per core). OpenMP threads wait
on each other, so a CPU shared with other jobs distorts everything (docs/benchmarks.md, "Training
step"): quote quiet-machine runs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import if_peer  # noqa: E402  (imports diffusers only when a peer is built)
from imagen_train import speedups  # noqa: E402
from imagen_train.config import Config, load_config  # noqa: E402
from imagen_train.diffusion import build_diffusion  # noqa: E402
from imagen_train.models import build_model  # noqa: E402
from imagen_train.training import speed  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, bf16 tensor core, dense
PEER_TOLERANCE = 0.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}



# FlopCounterMode has formulas for the GPU attention kernels but not for the flash-attention
# kernel SDPA dispatches to on a CPU, whose attention would count as 0 FLOPs. Its arguments
# start like the GPU kernels' (query, key, value; grad_out first in backward), so the same
# counts apply.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


# ----------------------------------------------------------------------------------------------
# Device helpers: synchronisation, matmul peak, memory.

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> list[float]:
    """Seconds of `reps` (n x n) @ (n x n) products in `dtype`, after untimed ones (a GPU's
    clocks ramp up over the first few)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(10 if device.type == "cuda" else 1):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _malloc_trim() -> None:
    """Hand freed heap memory back to the kernel (glibc), so RSS growth measures new use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class PeakGrowth:
    """`with PeakGrowth(device) as g: ...`, then `g.bytes`: the peak memory in use during the block
    above the amount in use at its start, and `g.kind`, how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
                _proc_status_bytes("VmHWM")
                self.kind = "cpu_vmhwm"
            except (OSError, AttributeError):
                self.kind = "cpu_maxrss"  # ru_maxrss cannot be reset: only growth past the old peak shows

    def __enter__(self) -> "PeakGrowth":
        synchronize(self.device)
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_vmhwm":
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_bytes("VmRSS")
        else:
            _malloc_trim()
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.kind == "cuda_max_allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_vmhwm":
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._base)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# ----------------------------------------------------------------------------------------------
# The batch, the networks and one training step.

def synthetic_batch(cfg: Config, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the loader gives it: images in [-1, 1], float16 T5 embeddings padded to max_length
    (row i keeps a different number of tokens), and the low-res image of the SR stages."""
    gen = torch.Generator().manual_seed(seed)
    res, length = cfg.train_resolution, cfg.text.max_length
    valid = torch.linspace(max(1, length // 4), length, batch).round().long()[:, None]  # (B, 1)
    out = {"image": torch.rand(batch, 3, res, res, generator=gen) * 2 - 1,  # (B, 3, H, W)
           "text_emb": torch.randn(batch, length, cfg.text.embed_dim, generator=gen).half(),  # (B, L, D)
           "text_mask": torch.arange(length)[None] < valid}  # (B, L)
    if cfg.lowres_resolution:
        low = cfg.lowres_resolution
        out["lowres"] = torch.rand(batch, 3, low, low, generator=gen) * 2 - 1  # (B, 3, h, w)
    return {k: v.to(device) for k, v in out.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that `fn()` runs (FlopCounterMode)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Trainable:
    """A network and its optimizer, stepped as the trainer steps it (one micro batch)."""

    name: str
    module: torch.nn.Module
    forward: Callable  # our network signature, on the (possibly compiled) module
    set_recompute: Callable[[bool], None]
    cfg: Config
    dtype: torch.dtype
    device: torch.device
    notes: str = ""
    context: Callable[[], AbstractContextManager] = nullcontext  # entered around every step
    compile_mode: Optional[str] = None  # the mode `prepare` compiles in, when the config asks for it
    params: list = field(init=False)
    master: list = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    times: list = field(default_factory=list)
    growth_bytes: int = 0
    flops_per_sample: float = 0.0
    first_step_s: float = 0.0  # the first warm-up step: compile time, cuDNN's search, allocator growth
    compile_stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module.to(device=self.device, dtype=self.dtype).train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # bf16 (DeepSpeed's bf16 mode): bf16 weights and gradients, fp32 master weights for AdamW.
        self.master = self.params if self.dtype == torch.float32 else [
            p.detach().float().clone().requires_grad_(True) for p in self.params]
        o = self.cfg.optim
        # fused: one kernel over all tensors, as DeepSpeed steps AdamW on one flat partition (FusedAdam
        # on a GPU, torch AdamW on a CPU) rather than tensor by tensor.
        self.optimizer = torch.optim.AdamW(self.master, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=True)
        self.diffusion = build_diffusion(self.cfg.diffusion)
        self.call = speed.network_caller(self.forward, self.cfg.training, self.dtype)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.diffusion.training_loss(self.call, batch["image"], batch["text_emb"], batch["text_mask"],
                                            lowres=batch.get("lowres")).mean()

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clip, AdamW; gradients freed afterwards (as DeepSpeed does)."""
        with self.context(), cudnn_benchmark(self.cfg.training.cudnn_benchmark):
            loss = self.loss(batch)
            loss.backward()
        if self.master is not self.params:
            for m, p in zip(self.master, self.params):
                m.grad, p.grad = p.grad.float(), None
        if self.cfg.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.master, self.cfg.training.grad_clip)
        self.optimizer.step()
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def count_flops_per_sample(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one sample's forward + backward (no recomputation), on the eager module."""
        self.set_recompute(False)
        try:
            with self.context():
                total = count_flops(lambda: self.loss(batch).backward())
        finally:
            self.set_recompute(self.cfg.model.activation_checkpointing)
            for p in self.params:
                p.grad = None
        self.flops_per_sample = total / batch["image"].shape[0]
        return self.flops_per_sample

    def state_bytes(self) -> int:
        """Weights, fp32 masters, optimizer moments and buffers: what stays between steps."""
        opt_state = [t for s in self.optimizer.state.values() for t in s.values()]
        return tensor_bytes(list(self.module.parameters()) + list(self.module.buffers()) + self.master + opt_state)


@contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN's algorithm search on or off for one network's steps (the flag is process-wide)."""
    before = torch.backends.cudnn.benchmark
    speedups.set_cudnn_benchmark(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class Baseline(NamedTuple):
    """Another form of our step, trained beside the current one by --baseline to measure a change
    before and after in one process: config overrides of its copy, a model option set on its
    network, and/or a context entered around each of its steps."""

    label: str
    overrides: tuple[str, ...] = ()
    configure: Callable[[torch.nn.Module], Any] = lambda net: None
    context: Callable[[], AbstractContextManager] = nullcontext


@contextmanager
def _unmasked_attention():
    """Every SDPA call of the step without its attention mask: what a layout that needs no mask
    could gain (flash kernels on a GPU). Not the same numerics: the padding is attended."""
    original = torch.nn.functional.scaled_dot_product_attention

    def unmasked(query, key, value, attn_mask=None, *args, **kwargs):
        return original(query, key, value, None, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = unmasked
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


BASELINES: dict[str, Baseline] = {
    "composed-norm": Baseline("ours, GroupNorm/FiLM/SiLU composed", ("training.fused_norm=never",)),
    # Whatever the map's device, dtype, size or layout: would the region pay on this device too?
    "fused-norm-everywhere": Baseline("ours, fused GroupNorm/FiLM/SiLU on every map", ("training.fused_norm=always",)),
    "groupnorm-fp32-copy": Baseline("ours, GroupNorm on a float32 copy of its input",
                                    configure=partial(speedups.apply_groupnorm_upcast, enabled=True)),
    "no-cudnn-benchmark": Baseline("ours, no cuDNN algorithm search", ("training.cudnn_benchmark=false",)),
    "eager": Baseline("ours, eager (no torch.compile)", ("training.compile=false",)),
    "math-attention": Baseline("ours, math attention", context=lambda: torch.nn.attention.sdpa_kernel(
        torch.nn.attention.SDPBackend.MATH)),
    "unmasked-attention": Baseline("ours, attention without masks (upper bound)", context=_unmasked_attention),
}


def baseline(name: str) -> Baseline:
    """A named baseline, or `set:KEY=VALUE[,KEY=VALUE]`: a copy with those config overrides."""
    if name.startswith("set:"):
        overrides = tuple(item for item in name[len("set:"):].split(",") if item)
        if not overrides or not all("=" in item for item in overrides):
            raise SystemExit(f"--baseline {name}: expected set:KEY=VALUE[,KEY=VALUE]")
        return Baseline("ours, " + ", ".join(overrides), overrides)
    if name not in BASELINES:
        raise SystemExit(f"--baseline {name}: expected one of {sorted(BASELINES)} or set:KEY=VALUE")
    return BASELINES[name]


def _ours(cfg: Config, dtype: torch.dtype, device: torch.device, baseline_name: Optional[str] = None,
          config_path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Trainable:
    """Our network built as training builds it (on `device`: a GPU initialises 500M weights in a
    blink), with the config's speed options applied through the trainer's own function; a baseline
    reloads the config with its overrides on top of `overrides`."""
    before = baseline(baseline_name) if baseline_name else Baseline("ours")
    if before.overrides:
        cfg = load_config(config_path, list(overrides) + list(before.overrides))
    torch.manual_seed(cfg.training.seed)
    net = build_model(cfg.model, cfg.text, cfg.stage, cfg.train_resolution, device=device)
    speed.apply_model_options(net, cfg)
    before.configure(net)

    def set_recompute(enabled: bool) -> None:
        speedups.apply_activation_checkpointing(net, enabled)

    return Trainable(before.label, net, net, set_recompute, cfg, dtype, device, context=before.context,
                     compile_mode=cfg.training.compile_mode if cfg.training.compile else None)


def _peer(cfg: Config, target_params: int, dtype: torch.dtype, device: torch.device) -> Trainable:
    if cfg.stage != "base64":
        raise SystemExit(f"--peer compares with IF's stage-I network: use a base64 config, not {cfg.stage}")
    kwargs, count = if_peer.match_peer(cfg, target_params)
    if abs(count / target_params - 1) > PEER_TOLERANCE:
        raise SystemExit(f"no IF-style peer within {PEER_TOLERANCE:.0%} of {target_params:,} parameters "
                         f"(closest: {count:,}, {kwargs['block_out_channels']}, {kwargs['layers_per_block']})")
    torch.manual_seed(cfg.training.seed)
    unet = if_peer.build_peer(kwargs)
    if_peer.set_peer_recompute(unet, cfg.model.activation_checkpointing)
    notes = (f"UNet2DConditionModel, block_out_channels {kwargs['block_out_channels']}, layers_per_block "
             f"{kwargs['layers_per_block']}, {kwargs['down_block_types']}")
    return Trainable("peer (diffusers IF-I)", unet, if_peer.peer_forward(unet),
                     partial(if_peer.set_peer_recompute, unet), cfg, dtype, device, notes,
                     compile_mode="whole" if cfg.training.compile else None)  # a foreign module: whole


def prepare(t: Trainable, batch: dict[str, torch.Tensor], warmup: int, backend: str = "inductor") -> None:
    """Count FLOPs on the eager module, then compile (as its config asks, through the trainer's own
    function) and take the warm-up steps; the first one's time is kept (compile time and all)."""
    t.count_flops_per_sample(batch)
    if t.compile_mode is not None:
        before = speedups.compile_counters()
        training = dataclasses.replace(t.cfg.training, compile=True, compile_mode=t.compile_mode)
        speed.apply_compile(t.module, training, log=print, backend=backend)  # in place, as the trainer does
    for i in range(warmup):
        synchronize(t.device)
        start = time.perf_counter()
        t.step(batch)
        synchronize(t.device)
        if i == 0:
            t.first_step_s = time.perf_counter() - start
    if t.compile_mode is not None:
        after = speedups.compile_counters()
        t.compile_stats = {key: after[key] - before[key] for key in after}


def timed_steps(t: Trainable, batch: dict[str, torch.Tensor], steps: int, settle: int = 1) -> str:
    """Take `settle` untimed steps, then `steps` steps recording each one's wall time, all inside one
    memory-growth probe; returns how memory was measured.

    The settling steps are not timed because the first step of a round runs just after the probe's
    malloc_trim (which hands freed memory back to the OS, so the step faults its pages in again)
    and after the other network's round, which makes it the round's slowest step
    (docs/benchmarks.md, "Settled rounds").
    """
    with PeakGrowth(t.device) as growth:
        for _ in range(settle):
            t.step(batch)
        for _ in range(steps):
            synchronize(t.device)
            start = time.perf_counter()
            t.step(batch)
            synchronize(t.device)
            t.times.append(time.perf_counter() - start)
    t.growth_bytes = max(t.growth_bytes, growth.bytes)
    return growth.kind


# ----------------------------------------------------------------------------------------------
# Report.

def summarize(t: Trainable, batch: int, peak_tflops: float, mem_kind: str) -> dict[str, Any]:
    step_s = statistics.median(t.times)
    samples_per_s = batch / step_s
    tflops = t.flops_per_sample * samples_per_s / 1e12
    state = t.state_bytes()
    return {"name": t.name, "params": t.num_params, "notes": t.notes, "step_s_median": step_s,
            "step_s": t.times, "samples_per_s": samples_per_s,
            "flops_per_sample": t.flops_per_sample, "achieved_tflops": tflops, "mfu": tflops / peak_tflops,
            "peak_mem_gib": (state + t.growth_bytes) / 2**30, "state_mem_gib": state / 2**30,
            "step_mem_gib": t.growth_bytes / 2**30, "mem_kind": mem_kind, "first_step_s": t.first_step_s,
            "compile_mode": t.compile_mode, "compile": t.compile_stats}


def prepared(t: Trainable) -> dict[str, Any]:
    """What is known of a network once it is compiled and warm (the partial JSON's entries)."""
    return {"name": t.name, "params": t.num_params, "flops_per_sample": t.flops_per_sample,
            "first_step_s": t.first_step_s, "compile_mode": t.compile_mode, "compile": t.compile_stats}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def table(result: dict[str, Any]) -> str:
    """Plain-text report of `result` (the JSON this script writes)."""
    lines = [f"device: {result['device']}; torch {result['torch']}; config {result['config']} "
             f"{' '.join(result['overrides'])}".rstrip(),
             f"stage {result['stage']} at {result['resolution']} px, batch {result['batch']}, {result['precision']}, "
             f"channels_last={result['channels_last']}, compile={result['compile']}, "
             f"activation_checkpointing={result['activation_checkpointing']}; "
             f"{result['steps_per_model']} timed steps per network in {result['rounds']} round(s) "
             f"(each after {result['settle']} untimed), "
             f"{result['warmup']} warm-up",
             f"measured peak: {result['matmul_n']}x{result['matmul_n']} {result['precision']} matmul, median of "
             f"{result['matmul_reps']}: {result['matmul_peak_tflops']:.3f} TFLOP/s"]
    if result.get("datasheet_tflops"):
        lines.append(f"reference: H100 SXM bf16 dense datasheet {result['datasheet_tflops']:.0f} TFLOP/s "
                     f"(MFU against it: " + ", ".join(f"{m['name']} {m['achieved_tflops'] / result['datasheet_tflops']:.1%}"
                                                      for m in result["models"]) + ")")
    header = ("| network | params | step ms (median) | samples/s | GFLOP/sample (fwd+bwd) | TFLOP/s | MFU "
              "| peak mem GiB (state + step) |")
    lines += ["", header, "|" + "---|" * 8]
    for m in result["models"]:
        lines.append(f"| {m['name']} | {m['params'] / 1e6:.2f}M | {m['step_s_median'] * 1e3:.1f} | "
                     f"{m['samples_per_s']:.2f} | {m['flops_per_sample'] / 1e9:.3f} | {m['achieved_tflops']:.4f} | "
                     f"{m['mfu']:.1%} | {m['peak_mem_gib']:.3f} ({m['state_mem_gib']:.3f} + "
                     f"{m['step_mem_gib']:.3f}) |")
    if "ratio" in result:
        r = result["ratio"]
        lines += ["", f"ours / peer: samples/s {r['samples_per_s']:.2f}x, peak memory {r['peak_mem']:.2f}x, "
                      f"parameters {r['params']:.3f}x"]
    for r in result.get("speedups", []):
        lines += [f"ours / {r['baseline']} baseline: samples/s {r['samples_per_s']:.3f}x, "
                  f"peak memory {r['peak_mem']:.2f}x"]
    for m in result["models"]:
        if m.get("compile_mode"):
            lines.append(f"{m['name']}: torch.compile ({m['compile_mode']}) first step {m['first_step_s']:.1f} s "
                         f"against a median step of {m['step_s_median']:.3f} s; dynamo {m['compile']}")
    lines.append(f"memory: {result['models'][0]['mem_kind']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a stage config, e.g. configs/base64-35m.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--precision", choices=sorted(DTYPES), help="default: the config's training.precision")
    parser.add_argument("--batch", type=int, help="micro batch (default: training.micro_batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per network (split over the rounds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per network first")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (A/B/A/B with --peer)")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed steps at the start of each round (memory still measured over them)")
    parser.add_argument("--peer", action="store_true", help="also train the matched diffusers IF-I peer")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME",
                        help=f"also train a copy of our network with one change (repeatable): one of "
                             f"{sorted(BASELINES)}, or set:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--matmul-n", type=int, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--matmul-reps", type=int, default=3, help="timed matmuls per round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager: dynamo alone, for a CPU rehearsal of the compile path)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = list(args.set) + ([f"training.precision={args.precision}"] if args.precision else [])
    cfg = load_config(args.config, overrides)
    precision = cfg.training.precision
    if precision not in DTYPES:
        raise SystemExit(f"training.precision={precision}: this benchmark runs fp32 or bf16")
    dtype = DTYPES[precision]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch or cfg.training.micro_batch_size
    for name in args.baseline:
        baseline(name)  # an unknown name stops the run before anything is built
    if args.compile_backend == "inductor" and (cfg.training.compile or any(
            "training.compile=true" in baseline(n).overrides for n in args.baseline)):
        speed.check_compile(device.type)
    batch = synthetic_batch(cfg, batch_size, device)

    models = [_ours(cfg, dtype, device)]
    if args.peer:
        models.append(_peer(cfg, models[0].num_params, dtype, device))
    models += [_ours(cfg, dtype, device, name, args.config, tuple(overrides)) for name in args.baseline]
    for t in models:
        prepare(t, batch, args.warmup, args.compile_backend)
    if args.json:  # what a run cut short during the timed rounds still leaves
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"partial": True, "config": args.config, "batch": batch_size,
                                               "precision": precision, "device": device_name(device),
                                               "prepared": [prepared(t) for t in models]}, indent=2))

    # Alternate the networks (A/B/A/B) and the matmul peak, so slow drifts of a shared machine
    # touch all of them alike.
    matmul_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    matmul_times: list[float] = []
    per_round = math.ceil(args.steps / args.rounds)
    mem_kind = ""
    for _ in range(args.rounds):
        matmul_times += matmul_seconds(device, dtype, matmul_n, args.matmul_reps)
        for t in models:
            mem_kind = timed_steps(t, batch, per_round, args.settle)
    peak_tflops = 2 * matmul_n**3 / statistics.median(matmul_times) / 1e12

    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "config": args.config, "overrides": args.set, "stage": cfg.stage, "resolution": cfg.train_resolution,
        "text": [cfg.text.max_length, cfg.text.embed_dim], "batch": batch_size, "precision": precision,
        "channels_last": cfg.training.channels_last, "compile": cfg.training.compile,
        "activation_checkpointing": cfg.model.activation_checkpointing, "baseline": args.baseline,
        "rounds": args.rounds, "steps_per_model": per_round * args.rounds, "warmup": args.warmup,
        "settle": args.settle,
        "matmul_n": matmul_n, "matmul_reps": len(matmul_times), "matmul_peak_tflops": peak_tflops,
        "datasheet_tflops": H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None,
        "models": [summarize(t, batch_size, peak_tflops, mem_kind) for t in models],
    }
    ours = result["models"][0]
    if args.peer:
        peer = result["models"][1]
        result["ratio"] = {"samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
                           "peak_mem": ours["peak_mem_gib"] / peer["peak_mem_gib"],
                           "params": ours["params"] / peer["params"]}
    others = result["models"][len(models) - len(args.baseline):]
    result["speedups"] = [{"baseline": name, "label": before["name"],
                           "samples_per_s": ours["samples_per_s"] / before["samples_per_s"],
                           "peak_mem": ours["peak_mem_gib"] / before["peak_mem_gib"]}
                          for name, before in zip(args.baseline, others)]
    print(table(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
