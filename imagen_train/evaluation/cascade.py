"""The cascaded sampler: text -> 64 px -> 256 px -> 1024 px (Saharia et al. 2022, figure A.4).

Memory: the text encoder runs once and is released before any UNet is loaded; each UNet is
loaded, run over every image, and released before the next, so the peak is the largest
stage's, not the sum (the reference keeps T5 and every UNet resident). Each stage's output
passes unclamped, at its native size, as the next stage's `lowres` input; the SR network
upsamples it itself (CONTRACTS.md).

    cfg = load_pipeline_config("configs/inference_pipeline.yaml")
    result = generate(cfg, cfg.prompts())
    write_outputs(cfg, result)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from imagen_train import speedups
from imagen_train.artifacts import load_network, stage_config
from imagen_train.config import Config, ConfigError, SamplerConfig
from imagen_train.diffusion import SampleResult, build_diffusion
from imagen_train.diffusion.caller import NetworkCaller, sampling_memory_format
from imagen_train.text import load_text_encoder
from .grids import make_grid, save_png, to_pil
from .memory import PeakMemory, release, synchronize
from .pipeline_config import InferencePipelineConfig


@dataclass
class StageStats:
    """What one stage (or the text encoder) cost.

    time_s = load_s + the sampling of every batch; the first batch's sampling is first_batch_s
    (it pays the one-off costs: kernel selection, allocator growth); the batches after it are
    the steady state (steady_images in steady_s; none when one batch held every image). For the
    text encoder, time_s is loading and encoding together.
    """

    stage: str
    resolution: int
    num_images: int
    time_s: float
    peak_mem_gib: float
    mem_kind: str
    nfe_per_image: int = 0        # network calls per image (Heun: 2N - 1)
    net_batch_factor: int = 1     # 2 with guidance: cond + uncond in one batch
    checkpoint: str = ""
    weights: str = ""
    dtype: str = ""
    load_s: float = 0.0           # building the network and loading its weights onto the device
    first_batch_s: float = 0.0
    steady_images: int = 0
    steady_s: float = 0.0
    final_nfe_per_image: int = 0  # unguided calls of the final denoising average, if any

    @property
    def images_per_s(self) -> float:
        """Over the whole stage, loading and the first batch included."""
        return self.num_images / max(self.time_s, 1e-9)

    @property
    def steady_images_per_s(self) -> float:
        """After the first batch (0 when there was no second batch)."""
        return self.steady_images / self.steady_s if self.steady_images else 0.0

    @property
    def first_image_s(self) -> float:
        """The stage's part of the time to a first image: loading, then the first batch."""
        return self.time_s if self.stage == "text_encoder" else self.load_s + self.first_batch_s


def time_to_first_image(stats: Sequence[StageStats]) -> float:
    """Seconds from nothing loaded to the first finished image of the last stage in `stats`: the
    text encoder (load and encode), then each stage's build + load and first batch. A run of one
    batch takes this long; with more batches each stage first samples all of them."""
    return sum(s.first_image_s for s in stats)


@dataclass
class CascadeResult:
    """Final images (N, 3, H, W) float32 on CPU, unclamped; prompt of each image; costs. With
    keep_stage_images: each stage's output, and (for stages whose sampler ends on the final
    denoising average) the same before that average."""

    images: Tensor
    prompts: list[str]
    stats: list[StageStats] = field(default_factory=list)
    stage_images: dict[str, Tensor] = field(default_factory=dict)
    stage_images_before_final: dict[str, Tensor] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Precision:
    """Weight dtype and autocast for an `inference_precision` mode on a device.

    "auto": float32 on a CPU (bf16 convolutions are ~70x slower on AVX2 CPUs); on a GPU bf16 where
    it has bf16 (weights trained in bf16 or fp32 keep their range: bf16 has float32's exponent),
    else the training precision when that was fp16, else float32. "bf16": bf16 anywhere. 16: fp16
    on a GPU (bf16 on a CPU, which has no fp16 convolutions): weights trained in bf16 can overflow
    it, so `check_finite` refuses a stage's non-finite output. 32: float32. "AMP": float32 weights
    under autocast (fp16 on a GPU, bf16 on a CPU). `trained`: the stage's `training.precision`.
    """

    def __init__(self, mode: int | str, device: torch.device, trained: Optional[str] = None):
        self.mode, self.device, self.trained = mode, device, trained
        half = torch.float16 if device.type == "cuda" else torch.bfloat16  # no fp16 convs on CPU
        self.weight_dtype = {16: half, "bf16": torch.bfloat16, "auto": self._auto()}.get(mode, torch.float32)
        self.autocast_dtype = half if mode == "AMP" else None

    def _auto(self) -> torch.dtype:
        if self.device.type != "cuda":
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if self.trained == "fp16" else torch.float32

    def caller(self, net: Callable) -> NetworkCaller:
        """`net` called in this precision, its output in the sampler's float32; the conditioning is
        cast once per run (the same tensors at every step)."""
        return NetworkCaller(net, dtype=self.weight_dtype, autocast=self.autocast_dtype, cache_conditioning=True,
                             memory_format=sampling_memory_format(self.device))

    def check_finite(self, images: Tensor, stage: str) -> None:
        """Raise if a stage's output (a CPU copy: no device sync) holds inf or NaN, naming the setting."""
        if bool(torch.isfinite(images).all()):
            return
        hint = (f"fp16 overflowed on weights trained in {self.trained}; set inference_precision to 'auto' "
                "or 'bf16' (bf16 has float32's range)") if self.weight_dtype == torch.float16 else \
            "the checkpoint's weights or this precision give inf/NaN"
        raise FloatingPointError(f"stage {stage} produced non-finite images with inference_precision="
                                 f"{self.mode!r} ({self.name}): {hint}")

    @property
    def name(self) -> str:
        if self.autocast_dtype is not None:
            return f"amp_{str(self.autocast_dtype).removeprefix('torch.')}"
        return str(self.weight_dtype).removeprefix("torch.")


def network_call(net: torch.nn.Module, how: str, device: torch.device) -> Callable:
    """`net` as the sampler calls it (`network_call`): as it is ("eager"), through torch.compile of
    the whole network ("compile"; compiled at the first call, so the first batch pays it), or
    replayed from CUDA graphs captured per input shape ("cuda_graphs", GPU only)."""
    if how == "eager":
        return net
    if how == "cuda_graphs":
        if device.type != "cuda":
            raise ConfigError("network_call", "'eager' or 'compile' on a CPU (CUDA graphs need a GPU)", how)
        return speedups.CUDAGraphCall(net)
    speedups.check_compile(device.type, key="network_call")
    speedups.apply_compile(net, "whole")
    return net


# ----------------------------------------------------------------------------------------------
# Checkpoints: an exported safetensors file or a training checkpoint folder (imagen_train.artifacts).

def load_stage(path: str, ema: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Config]:
    """A stage's network with its EMA (or raw) weights, on `device` in `dtype`, eval mode, no grads
    (`artifacts.load_network`: an export file, a checkpoint folder or a checkpoints root)."""
    net, cfg = load_network(path, weights="ema" if ema else "raw", device=device, dtype=dtype)
    return net.requires_grad_(False), cfg


# ----------------------------------------------------------------------------------------------
# The cascade.

def encode_prompts(encoder_path: Optional[str], texts: Sequence[str], device: torch.device,
                   max_length: int, precision: Precision) -> tuple[Tensor, Tensor, StageStats]:
    """Run the T5 encoder once over `texts` and release it: (emb (P, L, D), mask (P, L), stats)."""
    if not encoder_path:
        raise ConfigError("encoder_path", "a local T5 save_pretrained folder (nothing is downloaded)", None)
    dtype = torch.float32 if precision.mode == 32 or device.type == "cpu" else None
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        encoder = load_text_encoder(encoder_path, device, dtype=dtype, max_length=max_length)
        emb, mask = encoder.encode(list(texts), max_length=max_length, pad_to_max_length=True)
        emb = emb.float()
        del encoder
        release(device)
    stats = StageStats("text_encoder", 0, len(texts), time.perf_counter() - start, mem.peak_gib, mem.kind,
                       checkpoint=str(encoder_path), dtype=str(dtype or "default"))
    return emb, mask, stats


def sample_in_batches(diffusion, caller, sampler: SamplerConfig, resolution: int, emb: Tensor, mask: Tensor,
                      lowres: Optional[Tensor], batch_size: int, generator: torch.Generator,
                      device: torch.device, before_batch: Optional[Callable[[int], None]] = None,
                      num_batches: int = 0) -> tuple[Tensor, Optional[Tensor], Optional[SampleResult], list[float]]:
    """Sample one image per row of emb (N, L, D) / mask (N, L) [/ lowres (N, 3, h, w)], `batch_size`
    rows per call, each batch moved to `device`: the one batched sampling loop (the cascade, the
    sweep, the quickstart and periodic evaluation).

    `before_batch(b)` runs before batch b (periodic evaluation asks there whether to stop, a
    collective); with `num_batches` it runs at least that many times, batches past the last row
    drawing nothing, so that every rank asks as often whatever its share of rows.

    Returns the images (N, 3, R, R) float32 on CPU, unclamped; the same before the sampler's final
    denoising average (None without one); the last batch's SampleResult (its NFE counts); each
    batch's seconds.
    """
    out, before, result, batch_s = [torch.zeros(0, 3, resolution, resolution)], [], None, []
    rows = emb.shape[0]
    for b, i in enumerate(range(0, max(rows, num_batches * batch_size), batch_size)):
        if before_batch is not None:
            before_batch(b)
        if i >= rows:
            continue
        batch_start = time.perf_counter()
        e, m = emb[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)
        low = None if lowres is None else lowres[i:i + batch_size].to(device)
        result = diffusion.sample(caller, (e.shape[0], 3, resolution, resolution), e, m, sampler, lowres=low,
                                  generator=generator)
        out.append(result.images.float().cpu())  # waits for the device
        if result.before_final is not None:
            before.append(result.before_final.float().cpu())
        batch_s.append(time.perf_counter() - batch_start)
    return torch.cat(out), torch.cat(before) if before else None, result, batch_s


def draw_stage(path: str, sampler: SamplerConfig, emb: Tensor, mask: Tensor, device: torch.device,
               precision: Precision, lowres: Optional[Tensor], generator: torch.Generator, batch_size: int,
               ema: bool = True, stage: Optional[str] = None, how: str = "eager"
               ) -> tuple[Tensor, StageStats, Optional[Tensor]]:
    """Load the stage at `path`, sample one image per row (in batches), release it.

    emb (N, L, D) / mask (N, L): one row per output image. lowres: (N, 3, h, w) or None. `stage`,
    when given, must be the checkpoint's stage; `how`: the `network_call` mode. Returns the images
    (N, 3, H, W) float32 on CPU, unclamped, what the stage cost, and the images before the final
    denoising average (or None).
    """
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        net, stage_cfg = load_stage(path, ema, device, precision.weight_dtype)
        synchronize(device)
        load_s = time.perf_counter() - start
        if stage is not None and stage_cfg.stage != stage:
            raise ValueError(f"checkpoints.{stage}={path} holds a {stage_cfg.stage} model")
        caller = precision.caller(network_call(net, how, device))
        L = stage_cfg.text.max_length
        images, before_final, result, batch_s = sample_in_batches(
            build_diffusion(stage_cfg.diffusion), caller, sampler, stage_cfg.output_resolution, emb[:, :L],
            mask[:, :L], lowres, batch_size, generator, device)
        precision.check_finite(images, stage_cfg.stage)
        del net, caller
        release(device)
    nfe, factor, final_nfe = (result.nfe, result.net_batch_factor, result.final_nfe) if result else (0, 1, 0)
    stats = StageStats(stage_cfg.stage, stage_cfg.output_resolution, emb.shape[0], time.perf_counter() - start,
                       mem.peak_gib, mem.kind, nfe, factor, str(path), "ema" if ema else "raw", precision.name,
                       load_s=load_s, first_batch_s=batch_s[0] if batch_s else 0.0,
                       steady_images=emb.shape[0] - min(batch_size, emb.shape[0]), steady_s=sum(batch_s[1:]),
                       final_nfe_per_image=final_nfe)
    return images, stats, before_final


def run_stage(cfg: InferencePipelineConfig, stage: str, emb: Tensor, mask: Tensor, device: torch.device,
              precision: Precision, lowres: Optional[Tensor], seed: int
              ) -> tuple[Tensor, StageStats, Optional[Tensor]]:
    """One stage of the pipeline `cfg` (its checkpoint, sampler and batch size): `draw_stage`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return draw_stage(getattr(cfg.checkpoints, stage), cfg.sampler_for(stage), emb, mask, device, precision,
                      lowres, generator, cfg.batch_size, cfg.run_ema_model, stage, cfg.network_call)


def stage_seed(seed: int, index: int, offset: int = 0) -> int:
    """The noise seed of the pipeline's `index`-th stage (0: the base) for the pipeline seed `seed`."""
    return seed * 1000 + index * 100 + offset


def generate(cfg: InferencePipelineConfig, prompts: Sequence[str], device: Optional[torch.device] = None,
             seed_offset: int = 0, keep_stage_images: bool = False,
             text: Optional[tuple[Tensor, Tensor]] = None) -> CascadeResult:
    """Run the stages `cfg.target_resolution` needs for `num_images_per_prompt` images per prompt.

    `text` (emb (P, L, D), mask (P, L)) skips the encoder (e.g. a guidance sweep encodes once);
    `seed_offset` gives each rank of a distributed evaluation its own noise.
    """
    device = device or resolve_device(cfg.device)
    configs = {stage: stage_config(getattr(cfg.checkpoints, stage)) for stage in cfg.stages}
    precision = Precision(cfg.inference_precision, device)  # the text encoder's
    max_length = max(c.text.max_length for c in configs.values())
    stats: list[StageStats] = []
    if text is None:
        emb, mask, enc_stats = encode_prompts(cfg.encoder_path, prompts, device, max_length, precision)
        stats.append(enc_stats)
    else:
        emb, mask = text
    for stage, c in configs.items():
        if c.text.embed_dim != emb.shape[-1]:
            raise ValueError(f"checkpoints.{stage} expects text embeddings of width {c.text.embed_dim}; "
                             f"the encoder gives {emb.shape[-1]} (encoder_path={cfg.encoder_path})")
    k = cfg.num_images_per_prompt
    emb, mask = emb.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (P*K, L, D), prompt-major
    images, stage_images, before = None, {}, {}
    for index, stage in enumerate(cfg.stages):
        stage_precision = Precision(cfg.inference_precision, device, configs[stage].training.precision)
        images, s, before_final = run_stage(cfg, stage, emb, mask, device, stage_precision, images,
                                            seed=stage_seed(cfg.seed, index, seed_offset))
        stats.append(s)
        if keep_stage_images:
            stage_images[stage] = images
            if before_final is not None:
                before[stage] = before_final
    return CascadeResult(images, [p for p in prompts for _ in range(k)], stats, stage_images, before)


def write_outputs(cfg: InferencePipelineConfig, result: CascadeResult, prompts: Sequence[str]) -> Path:
    """PNG per image (images/pPPP_iII.png), a grid per prompt (grids/pPPP.png), settings.json."""
    out = Path(cfg.output_path)
    k = cfg.num_images_per_prompt
    for p in range(len(prompts)):
        for i in range(k):
            save_png(to_pil(result.images[p * k + i]), out / "images" / f"p{p:03d}_i{i:02d}.png")
        save_png(make_grid(result.images[p * k:(p + 1) * k]), out / "grids" / f"p{p:03d}.png")
    summary = {
        "settings": cfg.to_dict(),
        "prompts": list(prompts),
        "device": str(resolve_device(cfg.device)),
        "torch": torch.__version__,
        "stages": [{**asdict(s), "images_per_s": s.images_per_s, "steady_images_per_s": s.steady_images_per_s}
                   for s in result.stats],
        "time_to_first_image_s": time_to_first_image(result.stats),
        "peak_mem_gib_max_stage": max((s.peak_mem_gib for s in result.stats), default=0.0),
    }
    path = out / "settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


__all__ = ["generate", "write_outputs", "encode_prompts", "run_stage", "draw_stage", "sample_in_batches",
           "load_stage", "stage_config", "CascadeResult", "StageStats", "Precision", "network_call",
           "resolve_device", "stage_seed", "time_to_first_image"]
