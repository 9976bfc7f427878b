"""Typed configuration: one dataclass per component, filled from YAML.

`load_config(path, overrides)` reads a YAML file (which may name a `base:` file to extend),
applies dotted overrides such as `optim.lr=3e-5`, and returns a validated `Config`. Every
unknown key, wrong type or impossible value raises `ConfigError` naming the file, the dotted
key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from imagen_train.stages import STAGE_NAMES, StageName, get_stage
from imagen_train.utils.signals import is_stop_signal_name


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names file and key."""

    def __init__(self, key: str, expected: str, found: Any, source: str | None = None):
        self.key, self.expected, self.found, self.source = key, expected, found, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': expected {expected}, found {found!r}")


def _check(ok: bool, key: str, expected: str, found: Any) -> None:
    """Raise ConfigError for `key` (relative to the section) unless `ok`."""
    if not ok:
        raise ConfigError(key, expected, found)


# ----------------------------------------------------------------------------------------------
# Sections.

STAGES = STAGE_NAMES  # the stage names, in cascade order (imagen_train.stages has their facts)


@dataclass
class ModelConfig:
    """The denoising network. `kind` picks the base UNet or the Efficient UNet (SR stages)."""

    kind: Literal["unet", "efficient_unet"] = "unet"
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # One int for every level, or one entry per level.
    num_res_blocks: Union[int, list[int]] = 2
    # Image sizes (px at the network's training input size) whose levels get text attention.
    attention_resolutions: list[int] = field(default_factory=lambda: [32, 16, 8])
    # "fused": text tokens join the keys/values of the image self-attention (one masked
    # attention); "cross": a separate cross-attention after self-attention.
    attention_type: Literal["fused", "cross"] = "fused"
    # Efficient UNet only: self-attention at the attention levels as well as text attention.
    self_attention: bool = True
    num_head_channels: int = 64
    # Width of the projected text tokens and pooled text vector (NeMo's "cond dim").
    cond_dim: int = 512
    time_embed_mult: int = 4
    num_groups: int = 32
    dropout: float = 0.0
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        _check(levels >= 1, "channel_mult", "a non-empty list", self.channel_mult)
        _check(all(m > 0 for m in self.channel_mult), "channel_mult", "positive ints", self.channel_mult)
        _check(self.model_channels > 0, "model_channels", "a positive int", self.model_channels)
        blocks = self.num_res_blocks
        if isinstance(blocks, list):
            _check(len(blocks) == levels, "num_res_blocks",
                   f"an int or a list of {levels} ints (one per channel_mult level)", blocks)
            _check(all(b >= 0 for b in blocks), "num_res_blocks", "non-negative ints", blocks)
        else:
            _check(blocks >= 1, "num_res_blocks", "a positive int", blocks)
        _check(self.num_head_channels > 0, "num_head_channels", "a positive int", self.num_head_channels)
        _check(self.cond_dim > 0, "cond_dim", "a positive int", self.cond_dim)
        _check(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            _check(ch % self.num_groups == 0, "num_groups",
                   f"a divisor of every level's channels ({ch} at mult {mult})", self.num_groups)

    def blocks_per_level(self) -> list[int]:
        """Number of ResNet blocks at each level, expanded from an int if needed."""
        if isinstance(self.num_res_blocks, list):
            return list(self.num_res_blocks)
        return [self.num_res_blocks] * len(self.channel_mult)


@dataclass
class TextConfig:
    """The frozen text encoder's embeddings as the networks see them."""

    embed_dim: int = 4096  # T5-XXL v1.1: 4096; t5-11b: 1024
    max_length: int = 128
    encoder_path: Optional[str] = None  # a local save_pretrained folder (sampling, precompute)
    # Training batches: pad text to the batch's longest caption (rounded up to 8 tokens) instead
    # of max_length. Outputs are the same (padding is masked); attention and the text layers do
    # less work. false: every batch has max_length tokens (fixed shapes, e.g. for CUDA graphs).
    pad_to_longest: bool = True

    def __post_init__(self) -> None:
        _check(self.embed_dim > 0, "embed_dim", "a positive int", self.embed_dim)
        _check(self.max_length > 0, "max_length", "a positive int", self.max_length)


@dataclass
class NoiseAugConfig:
    """Noise-conditioning augmentation of the SR stages' low-res image (paper section 2.5)."""

    # Training: the augmentation level is drawn uniformly from [0, max_level] as a fraction of
    # the diffusion time (continuous) or mapped to sigma (EDM, see diffusion.augment).
    # At sampling the level is each stage's `SamplerConfig.noise_aug_level`.
    max_level: float = 0.5

    def __post_init__(self) -> None:
        _check(0.0 <= self.max_level <= 1.0, "max_level", "a float in [0, 1]", self.max_level)


@dataclass
class DiffusionConfig:
    """Parameterization, schedule and loss (continuous-time Gaussian diffusion or EDM)."""

    formulation: Literal["edm", "continuous"] = "edm"
    # Continuous-time model.
    schedule: Literal["cosine", "linear"] = "cosine"
    cosine_s: float = 0.008
    prediction: Literal["eps", "v", "x0"] = "eps"
    # EDM (Karras et al. 2022, table 1).
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # Classifier-free guidance: probability of dropping a sample's text at training.
    cond_drop_prob: float = 0.1
    noise_aug: NoiseAugConfig = field(default_factory=NoiseAugConfig)

    def __post_init__(self) -> None:
        _check(0.0 <= self.cond_drop_prob <= 1.0, "cond_drop_prob", "a float in [0, 1]", self.cond_drop_prob)
        _check(self.sigma_data > 0, "sigma_data", "a positive float", self.sigma_data)
        _check(self.p_std > 0, "p_std", "a positive float", self.p_std)
        _check(0 < self.sigma_min < self.sigma_max, "sigma_min",
               f"a positive float below sigma_max ({self.sigma_max})", self.sigma_min)
        _check(0 < self.cosine_s < 1, "cosine_s", "a float in (0, 1)", self.cosine_s)


@dataclass
class SamplerConfig:
    """One stage's sampler settings."""

    name: Literal["ddpm", "ddim", "edm_heun", "edm_stochastic", "dpmpp_2m"] = "edm_heun"
    steps: int = 30
    guidance_scale: float = 7.5
    thresholding: Literal["dynamic", "static", "none"] = "dynamic"
    dynamic_quantile: float = 0.995
    s_churn: float = 0.0
    s_noise: float = 1.0
    # SR stages: noise-augmentation level of the low-res conditioning image.
    noise_aug_level: float = 0.0

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", "a positive int", self.steps)
        _check(self.guidance_scale >= 0, "guidance_scale", "a non-negative float", self.guidance_scale)
        _check(0.5 < self.dynamic_quantile <= 1.0, "dynamic_quantile", "a float in (0.5, 1]",
               self.dynamic_quantile)
        _check(0.0 <= self.noise_aug_level <= 1.0, "noise_aug_level", "a float in [0, 1]",
               self.noise_aug_level)


@dataclass
class DataConfig:
    """Where training samples come from and how they are read."""

    # Brace pattern, list file (one shard a line), local paths or `pipe:` commands.
    train_shards: Optional[str] = None
    eval_shards: Optional[str] = None
    # Samples a worker holds to shuffle; each waits at most 2x this many newer ones, so a resume
    # re-reads at most about 2x this many samples plus one shard per worker (docs/training.md).
    shuffle_buffer: int = 1000
    num_workers: int = 2
    resampled: bool = True
    seed: int = 0
    # Skip images whose smaller side is below this (0: the stage's resolution).
    min_image_size: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True
    # Random instead of center crop of the stage's output square (the paper center-crops).
    random_crop: bool = False
    # A shard read that fails (I/O error, broken remote stream, `pipe:` silent for
    # read_timeout_s) is retried read_retries times, waiting retry_backoff_s * 2**attempt;
    # then the shard is skipped and counted (loader stats: skipped.bad_shard).
    read_retries: int = 3
    retry_backoff_s: float = 1.0
    read_timeout_s: float = 300.0
    # Before training, the first samples of this many shards (spread over the list) are checked
    # against the config: embedding schema and width, caption, image size (0: no check).
    preflight_shards: int = 16

    def __post_init__(self) -> None:
        _check(self.read_retries >= 0, "read_retries", "a non-negative int", self.read_retries)
        _check(self.retry_backoff_s >= 0, "retry_backoff_s", "a non-negative float", self.retry_backoff_s)
        _check(self.read_timeout_s > 0, "read_timeout_s", "a positive float", self.read_timeout_s)
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", "a non-negative int", self.shuffle_buffer)
        _check(self.num_workers >= 0, "num_workers", "a non-negative int", self.num_workers)
        _check(self.min_image_size >= 0, "min_image_size", "a non-negative int", self.min_image_size)
        _check(self.prefetch_factor >= 1, "prefetch_factor", "a positive int", self.prefetch_factor)
        _check(self.preflight_shards >= 0, "preflight_shards", "a non-negative int", self.preflight_shards)


@dataclass
class OptimizerConfig:
    """AdamW (reference: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Which AdamW kernel DeepSpeed steps: "torch-fused" (torch.optim.AdamW(fused=True): ships with
    # torch, on GPUs and CPUs, nothing to compile), "torch-foreach", or "deepspeed-fused"
    # (DeepSpeed's FusedAdam, built just in time: needs nvcc matching torch on a GPU node, gcc on a
    # CPU; built in the preflight). With training.offload_optimizer DeepSpeed's compiled CPU Adam
    # steps instead, whatever this says.
    implementation: Literal["torch-fused", "torch-foreach", "deepspeed-fused"] = "torch-fused"

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", "a positive float", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               "two floats in [0, 1)", self.betas)
        _check(self.eps > 0, "eps", "a positive float", self.eps)
        _check(self.weight_decay >= 0, "weight_decay", "a non-negative float", self.weight_decay)


@dataclass
class LRScheduleConfig:
    """Linear warm-up, then constant or cosine decay to `min_lr_ratio * lr` at `total_steps`."""

    warmup_steps: int = 10_000
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)


@dataclass
class TrainingConfig:
    """Batch sizes, precision and ZeRO settings; the DeepSpeed config is built from these."""

    max_steps: int = 1_000_000
    micro_batch_size: int = 16
    global_batch_size: int = 2048
    # None: derived as global / (micro * world size); given: must agree with them.
    grad_accum_steps: Optional[int] = None
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = 2
    offload_optimizer: bool = False
    grad_clip: float = 1.0
    seed: int = 0
    # Stop after this many consecutive non-finite losses (the last good checkpoint is kept).
    max_bad_steps: int = 20
    # Collective timeout, so a dead rank never hangs the others.
    dist_timeout_s: int = 1800
    log_every_steps: int = 10
    # Extra DeepSpeed config keys merged over the generated ones.
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    # Feed the network channels_last images, so convolutions and their activations run in NHWC
    # (the weights stay contiguous: DeepSpeed refuses channels_last parameters).
    channels_last: bool = False
    # torch.compile the network (inductor: a C++ compiler on a CPU, Triton on a GPU); the first
    # steps are slow while it compiles. Checked before training starts.
    compile: bool = False
    # "regional": compile each block the network runs in turn (ResBlocks, attention, resampling):
    # blocks of one shape share their compiled code, so compile time grows with the kinds of
    # block, not their number. "whole": the network as one graph.
    compile_mode: Literal["regional", "whole"] = "regional"
    # Start a new run from exported weights (a .safetensors file from launch/export.py): for
    # fine-tuning, or to change the world size or ZeRO stage. Ignored when a checkpoint is
    # resumed (the checkpoint wins). `init_from_weights` picks the export's "ema" or "raw" ones.
    init_from: Optional[str] = None
    init_from_weights: Literal["ema", "raw"] = "ema"
    # Signals that make every rank save at the next step boundary and exit 0 (preemption; the
    # advance warning of SLURM's --signal=B:USR1@300). docs/fault-tolerance.md, "Preemption".
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "max_steps", "a positive int", self.max_steps)
        _check(self.micro_batch_size >= 1, "micro_batch_size", "a positive int", self.micro_batch_size)
        _check(self.global_batch_size >= self.micro_batch_size, "global_batch_size",
               f"an int >= micro_batch_size ({self.micro_batch_size})", self.global_batch_size)
        _check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
               f"a multiple of micro_batch_size ({self.micro_batch_size})", self.global_batch_size)
        _check(self.grad_accum_steps is None or self.grad_accum_steps >= 1, "grad_accum_steps",
               "a positive int or null", self.grad_accum_steps)
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "one of 0, 1, 2, 3", self.zero_stage)
        _check(self.grad_clip >= 0, "grad_clip", "a non-negative float", self.grad_clip)
        _check(self.max_bad_steps >= 1, "max_bad_steps", "a positive int", self.max_bad_steps)
        _check(self.dist_timeout_s >= 1, "dist_timeout_s", "a positive int", self.dist_timeout_s)
        _check(self.log_every_steps >= 1, "log_every_steps", "a positive int", self.log_every_steps)
        _check(self.init_from is None or self.init_from.endswith(".safetensors"), "init_from",
               "null or a .safetensors export", self.init_from)
        _check(all(is_stop_signal_name(name) for name in self.stop_signals), "stop_signals",
               "a list of catchable signal names such as [SIGTERM, SIGINT, SIGUSR1]", self.stop_signals)

    def grad_accum_for(self, world_size: int) -> int:
        """Gradient accumulation steps so that micro x accum x world == global; error if impossible."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                "training.global_batch_size",
                f"a multiple of micro_batch_size x ranks = {self.micro_batch_size} x {world_size}",
                self.global_batch_size)
        accum = self.global_batch_size // per_step
        if self.grad_accum_steps is not None and self.grad_accum_steps != accum:
            raise ConfigError(
                "training.grad_accum_steps",
                f"{accum} (= global {self.global_batch_size} / (micro {self.micro_batch_size}"
                f" x {world_size} ranks))", self.grad_accum_steps)
        return accum


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (reference: 0.9999 every step)."""

    decay: float = 0.9999
    # Effective decay min(decay, (1 + step) / (warmup_steps + step)); 0 disables warm-up.
    warmup_steps: int = 0
    update_every_steps: int = 1

    def __post_init__(self) -> None:
        _check(0.0 <= self.decay < 1.0, "decay", "a float in [0, 1)", self.decay)
        _check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int", self.warmup_steps)
        _check(self.update_every_steps >= 1, "update_every_steps", "a positive int", self.update_every_steps)


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    every_steps: int = 1000
    keep_last: int = 3
    # None: `<run_dir>/checkpoints`.
    dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "every_steps", "a positive int", self.every_steps)
        _check(self.keep_last >= 1, "keep_last", "a positive int", self.keep_last)


@dataclass
class EvaluationConfig:
    """Periodic evaluation during training with the EMA weights."""

    eval_every_steps: int = 0  # 0: never
    prompts: list[str] = field(default_factory=list)
    num_images_per_prompt: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    num_fid_samples: int = 0
    inception_path: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (FID)
    clip_path: Optional[str] = None       # a CLIPModel save_pretrained folder (CLIP score)
    # Reference FID statistics (.npz from `data_tools fid-stats`); None: the eval shards' images.
    fid_stats_path: Optional[str] = None
    # Images sampled per rank per network call.
    batch_size: int = 8
    # Sampling noise seed (fixed, so grids of successive evaluations are comparable).
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.eval_every_steps >= 0, "eval_every_steps", "a non-negative int", self.eval_every_steps)
        _check(self.batch_size >= 1, "batch_size", "a positive int", self.batch_size)
        _check(self.num_images_per_prompt >= 1, "num_images_per_prompt", "a positive int",
               self.num_images_per_prompt)
        _check(self.num_fid_samples >= 0, "num_fid_samples", "a non-negative int", self.num_fid_samples)


@dataclass
class LoggingConfig:
    """Weights & Biases and console logging."""

    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    wandb_project: str = "imagen-train"
    wandb_entity: Optional[str] = None
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class Config:
    """A whole training run of one stage."""

    stage: StageName = "base64"
    # The square size the network trains on (sr1024 trains on 256 px crops).
    train_resolution: Optional[int] = None
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        spec = get_stage(self.stage)
        if self.train_resolution is None:
            self.train_resolution = spec.train_resolution
        res = self.train_resolution
        _check(res >= 8 and res % (2 ** (len(self.model.channel_mult) - 1)) == 0, "train_resolution",
               f"an int >= 8 divisible by 2^(levels-1) = {2 ** (len(self.model.channel_mult) - 1)}", res)
        _check(self.model.kind == spec.kind, "model.kind", f"'{spec.kind}' for stage {self.stage}",
               self.model.kind)
        _check(res <= spec.output_resolution, "train_resolution",
               f"at most {spec.output_resolution} for stage {self.stage}", res)

    @property
    def output_resolution(self) -> int:
        """Size of the images the stage produces at inference."""
        return get_stage(self.stage).output_resolution

    @property
    def lowres_resolution(self) -> Optional[int]:
        """Size of the low-res conditioning image at training (None for the base stage)."""
        return get_stage(self.stage).lowres_resolution(self.train_resolution)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML-safe) of every setting."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with errors that name the key.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an int", float: "a float", bool: "a bool", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, _type_name(tp), value)
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, _type_name(tp), value)
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                if err.key != key:  # an error inside a nested value: report it as it is
                    raise
        raise ConfigError(key, _type_name(tp), value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, _type_name(tp), value)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, "a mapping", value)
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(key, "null", value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "a bool (true/false)", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "an int", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, "a float", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, "a float", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, "a string", value)
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}" if prefix else k)
    for key in data:
        if key not in names:
            raise ConfigError(dotted(key), "one of " + ", ".join(sorted(names)), f"unknown key '{key}'")
    kwargs = {key: _coerce(value, hints[key], dotted(key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by __post_init__ with a key relative to this section
        raise ConfigError(dotted(err.key), err.expected, err.found) from None


def from_dict(data: dict[str, Any], cls: type = Config, source: str | None = None) -> Any:
    """Build `cls` from a nested dict; errors name `source` (a file) and the dotted key."""
    try:
        return _build(cls, data)
    except ConfigError as err:
        raise ConfigError(err.key, err.expected, err.found, source) from None


# ----------------------------------------------------------------------------------------------
# YAML files, `base:` inheritance and dotted overrides.

def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving its optional `base:` (relative to the file) recursively."""
    path = path.resolve()
    if path in seen:
        raise ConfigError("base", "a chain of files without cycles", " -> ".join(map(str, seen + (path,))),
                          str(path))
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("<file>", "valid YAML", str(err).splitlines()[0], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("<top level>", "a mapping", type(data).__name__, str(path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", "a path string", base, str(path))
    return _deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override of the form section.key=value", text, "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key, "a dotted key such as optim.lr", text, "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with each dotted override applied (sections are created as needed)."""
    data = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "a section", child, "--set")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (with `base:` inheritance), apply dotted overrides, validate."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), list(overrides or []))
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(data, Config, source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config` reads it back identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)


def configs_dir() -> Path:
    """The repository's `configs/` folder of named presets."""
    return Path(__file__).resolve().parent.parent / "configs"


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Load a named preset such as `sr256-400m` from `configs/`."""
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir().glob("*.yaml"))
        raise FileNotFoundError(f"unknown preset '{name}'; known presets: {', '.join(known)}")
    return load_config(path, overrides)
