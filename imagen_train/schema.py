"""The config schema: one typed dataclass per component, validated in `__post_init__`.

Each check raises `ConfigError` naming the key relative to its section; the loader
(`imagen_train.config`) prefixes the section and the file. No YAML here: models/ and diffusion/
import their sections from this module without loading the YAML machinery. The diffusion and
sampler sections (and the cascade sources, a path with a sampler) live in `schema_diffusion` and
are re-exported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from imagen_train.config_errors import ConfigError, check  # noqa: F401 (ConfigError is re-exported)
from imagen_train.schema_diffusion import (CascadeSourceConfig, DiffusionConfig, NoiseAugConfig,  # noqa: F401
                                          SamplerConfig)
from imagen_train.stages import STAGE_NAMES, StageName, get_stage
from imagen_train.utils.signals import is_stop_signal_name

# ----------------------------------------------------------------------------------------------
# Sections.

STAGES = STAGE_NAMES  # the stage names, in cascade order (imagen_train.stages has their facts)


@dataclass
class ModelConfig:
    """The denoising network. `kind` picks the base UNet or the Efficient UNet (SR stages)."""

    # "unet" (base stage) or "efficient_unet" (SR stages); must match the stage.
    kind: Literal["unet", "efficient_unet"] = "unet"
    # in_channels / out_channels: image channels in and out (RGB); an SR network also takes the
    # low-res image's in_channels.
    in_channels: int = 3
    out_channels: int = 3
    # Channels at the highest resolution; level i has model_channels * channel_mult[i].
    model_channels: int = 64
    # One multiplier per level; each level after the first halves the resolution.
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
    # Channels per attention head (heads = channels / this).
    num_head_channels: int = 64
    # Width of the projected text tokens and pooled text vector (NeMo's "cond dim").
    cond_dim: int = 512
    # Width of the noise-level embedding, as a multiple of model_channels.
    time_embed_mult: int = 4
    # GroupNorm groups; must divide every level's channels.
    num_groups: int = 32
    # Dropout in the ResNet blocks (training only).
    dropout: float = 0.0
    # Recompute each block's activations in the backward pass: less memory, ~30% more compute.
    # A speed option the trainer applies from outside the model (imagen_train/speedups.py).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        check(levels >= 1, "channel_mult", "a non-empty list", self.channel_mult)
        check(all(m > 0 for m in self.channel_mult), "channel_mult", "positive ints", self.channel_mult)
        check(self.model_channels > 0, "model_channels", "a positive int", self.model_channels)
        blocks = self.num_res_blocks
        if isinstance(blocks, list):
            check(len(blocks) == levels, "num_res_blocks",
                   f"an int or a list of {levels} ints (one per channel_mult level)", blocks)
            check(all(b >= 0 for b in blocks), "num_res_blocks", "non-negative ints", blocks)
        else:
            check(blocks >= 1, "num_res_blocks", "a positive int", blocks)
        check(self.num_head_channels > 0, "num_head_channels", "a positive int", self.num_head_channels)
        check(self.cond_dim > 0, "cond_dim", "a positive int", self.cond_dim)
        check(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            check(ch % self.num_groups == 0, "num_groups",
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
    # Text tokens the networks see: embeddings are padded (masked) or cut to this.
    max_length: int = 128
    encoder_path: Optional[str] = None  # a local save_pretrained folder (sampling, precompute)
    # Training batches: pad text to the batch's longest caption (rounded up to 8 tokens) instead
    # of max_length. Outputs are the same (padding is masked); attention and the text layers do
    # less work. false: every batch has max_length tokens (fixed shapes, e.g. for CUDA graphs).
    pad_to_longest: bool = True

    def __post_init__(self) -> None:
        check(self.embed_dim > 0, "embed_dim", "a positive int", self.embed_dim)
        check(self.max_length > 0, "max_length", "a positive int", self.max_length)


@dataclass
class DataConfig:
    """Where training samples come from and how they are read."""

    # Brace pattern, list file (one shard a line), local paths or `pipe:` commands.
    train_shards: Optional[str] = None
    # Periodic evaluation's shards: their captions (and images, for FID and the SR stages).
    eval_shards: Optional[str] = None
    # Samples a worker holds to shuffle; each waits at most 2x this many newer ones, so a resume
    # re-reads at most about 2x this many samples plus one shard per worker (docs/training.md).
    shuffle_buffer: int = 1000
    # Data loader processes per rank (0: read in the training process).
    num_workers: int = 2
    # Draw shards with replacement, endlessly (false: a new permutation of the shards each epoch).
    resampled: bool = True
    # Seed of the shard order, the shuffle buffer and the per-sample randomness (crops, text drop).
    seed: int = 0
    # Skip images whose smaller side is below this (0: the stage's resolution).
    min_image_size: int = 0
    # Batches each loader process prepares ahead.
    prefetch_factor: int = 2
    # Page-locked host memory for batches (faster copies to a GPU).
    pin_memory: bool = True
    # Random instead of center crop of the stage's output square (the paper center-crops).
    random_crop: bool = False
    # SR stages: blur each low-res input by a Gaussian of sigma uniform in [0, this] px at its own
    # resolution, as the earlier stage's samples are softer than downscaled training images (Ho
    # et al. 2021, conditioning augmentation). 0: never.
    lowres_blur_max_px: float = 0.0
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
        check(self.read_retries >= 0, "read_retries", "a non-negative int", self.read_retries)
        check(self.retry_backoff_s >= 0, "retry_backoff_s", "a non-negative float", self.retry_backoff_s)
        check(self.read_timeout_s > 0, "read_timeout_s", "a positive float", self.read_timeout_s)
        check(self.shuffle_buffer >= 0, "shuffle_buffer", "a non-negative int", self.shuffle_buffer)
        check(self.num_workers >= 0, "num_workers", "a non-negative int", self.num_workers)
        check(self.min_image_size >= 0, "min_image_size", "a non-negative int", self.min_image_size)
        check(self.prefetch_factor >= 1, "prefetch_factor", "a positive int", self.prefetch_factor)
        check(self.preflight_shards >= 0, "preflight_shards", "a non-negative int", self.preflight_shards)
        check(self.lowres_blur_max_px >= 0, "lowres_blur_max_px", "a non-negative float", self.lowres_blur_max_px)


@dataclass
class OptimizerConfig:
    """AdamW (reference: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01)."""

    # Peak learning rate, reached after lr_schedule.warmup_steps.
    lr: float = 1e-4
    # AdamW's decay rates of the gradient's first and second moments.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW's epsilon (added to the second moment's root).
    eps: float = 1e-8
    # Decoupled weight decay.
    weight_decay: float = 0.01
    # Which AdamW kernel DeepSpeed steps: "torch-fused" (torch.optim.AdamW(fused=True): ships with
    # torch, on GPUs and CPUs, nothing to compile), "torch-foreach", or "deepspeed-fused"
    # (DeepSpeed's FusedAdam, built just in time: needs nvcc matching torch on a GPU node, gcc on a
    # CPU; built in the preflight). With training.offload_optimizer DeepSpeed's compiled CPU Adam
    # steps instead, whatever this says.
    implementation: Literal["torch-fused", "torch-foreach", "deepspeed-fused"] = "torch-fused"

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "a positive float", self.lr)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               "two floats in [0, 1)", self.betas)
        check(self.eps > 0, "eps", "a positive float", self.eps)
        check(self.weight_decay >= 0, "weight_decay", "a non-negative float", self.weight_decay)


@dataclass
class LRScheduleConfig:
    """Linear warm-up, then constant or cosine decay to `min_lr_ratio * lr` at `total_steps`."""

    # Optimizer steps of the linear warm-up from 0 to optim.lr.
    warmup_steps: int = 10_000
    # After warm-up: constant, or cosine down to min_lr_ratio * lr at training.max_steps.
    decay: Literal["constant", "cosine"] = "constant"
    # The cosine decay's final learning rate, as a fraction of optim.lr.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int", self.warmup_steps)
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)


@dataclass
class TrainingConfig:
    """Batch sizes, precision and ZeRO settings; the DeepSpeed config is built from these."""

    # Optimizer steps to train; the run ends with a checkpoint there.
    max_steps: int = 1_000_000
    # Samples per rank per forward/backward pass.
    micro_batch_size: int = 16
    # Samples per optimizer step over all ranks (= micro x accumulation x ranks).
    global_batch_size: int = 2048
    # None: derived as global / (micro * world size); given: must agree with them.
    grad_accum_steps: Optional[int] = None
    # Training precision; fp32 on a CPU (DeepSpeed refuses fp16 there, bf16 convolutions are slow).
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # The dtype the micro batches' gradients are summed in (DeepSpeed's grad_accum_dtype, whose
    # own default is the model's dtype). "auto": fp32 under bf16 at ZeRO 1-3; the model's
    # dtype otherwise (DeepSpeed 0.19.8 has no fp32 accumulation without ZeRO).
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + weights sharded over ranks.
    zero_stage: int = 2
    # Keep the optimizer states in CPU memory (ZeRO-Offload; GPU runs only).
    offload_optimizer: bool = False
    # Clip the global gradient norm to this (0: no clipping).
    grad_clip: float = 1.0
    # Seed of the weight initialisation and the training noise.
    seed: int = 0
    # Stop after this many consecutive non-finite losses (the last good checkpoint is kept).
    max_bad_steps: int = 20
    # Collective timeout, so a dead rank never hangs the others.
    dist_timeout_s: int = 1800
    # Steps between logged training metrics (metrics.jsonl, W&B, the console).
    log_every_steps: int = 10
    # Extra DeepSpeed config keys merged over the generated ones.
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)
    # Feed the network channels_last images, so convolutions and their activations run in NHWC
    # (the weights stay contiguous: DeepSpeed refuses channels_last parameters).
    channels_last: bool = False
    # torch.compile the network (inductor: a C++ compiler on a CPU, Triton on a GPU); the first
    # steps are slow while it compiles. Checked before training starts. Off until a GPU run
    # measures it faster over a realistic run, compile time included (docs/benchmarks.md).
    compile: bool = False
    # "regional": compile each block the network runs in turn (ResBlocks, attention, resampling):
    # blocks of one shape share their compiled code, so compile time grows with the kinds of
    # block, not their number. "whole": the network as one graph.
    compile_mode: Literal["regional", "whole"] = "regional"
    # Where inductor keeps compiled graphs and kernels between runs (null: TORCHINDUCTOR_CACHE_DIR,
    # else ~/.cache/imagen_train/inductor).
    compile_cache_dir: Optional[str] = None
    # Where the ResBlocks' GroupNorm -> FiLM -> SiLU regions run as one autograd function
    # (models/norm_act.py): "auto" (large channels_last CPU float32 maps, where it measured faster),
    # "never", "always".
    fused_norm: Literal["auto", "never", "always"] = "auto"
    # cuDNN's per-shape convolution algorithm search (GPU only; the shapes are fixed per stage).
    cudnn_benchmark: bool = True
    # Start a new run from exported weights (a .safetensors file from launch/export.py): for
    # fine-tuning, or to change the world size or ZeRO stage. Ignored when a checkpoint is
    # resumed (the checkpoint wins). `init_from_weights` picks the export's "ema" or "raw" ones.
    init_from: Optional[str] = None
    init_from_weights: Literal["ema", "raw"] = "ema"
    # Signals that make every rank save at the next step boundary and exit 0 (preemption; the
    # advance warning of SLURM's --signal=B:USR1@300). docs/fault-tolerance.md, "Preemption".
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "max_steps", "a positive int", self.max_steps)
        check(self.micro_batch_size >= 1, "micro_batch_size", "a positive int", self.micro_batch_size)
        check(self.global_batch_size >= self.micro_batch_size, "global_batch_size",
               f"an int >= micro_batch_size ({self.micro_batch_size})", self.global_batch_size)
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
               f"a multiple of micro_batch_size ({self.micro_batch_size})", self.global_batch_size)
        check(self.grad_accum_steps is None or self.grad_accum_steps >= 1, "grad_accum_steps",
               "a positive int or null", self.grad_accum_steps)
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "one of 0, 1, 2, 3", self.zero_stage)
        check(self.grad_accum_dtype != "bf16" or self.precision == "bf16", "grad_accum_dtype",
              f"'auto' or 'fp32' with precision={self.precision} (bf16 only for a bf16 run)", "bf16")
        check(self.grad_accum_dtype != "fp32" or self.zero_stage >= 1 or self.precision == "fp32",
              "grad_accum_dtype", f"'auto' or '{self.precision}' at zero_stage=0 (DeepSpeed accumulates "
              f"in fp32 under {self.precision} only at ZeRO 1-3)", "fp32")
        check(self.grad_clip >= 0, "grad_clip", "a non-negative float", self.grad_clip)
        check(self.max_bad_steps >= 1, "max_bad_steps", "a positive int", self.max_bad_steps)
        check(self.dist_timeout_s >= 1, "dist_timeout_s", "a positive int", self.dist_timeout_s)
        check(self.log_every_steps >= 1, "log_every_steps", "a positive int", self.log_every_steps)
        check(self.init_from is None or self.init_from.endswith(".safetensors"), "init_from",
               "null or a .safetensors export", self.init_from)
        check(all(is_stop_signal_name(name) for name in self.stop_signals), "stop_signals",
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

    # EMA decay per update.
    decay: float = 0.9999
    # Effective decay min(decay, (1 + step) / (warmup_steps + step)); 0 disables warm-up.
    warmup_steps: int = 0
    # Optimizer steps between EMA updates.
    update_every_steps: int = 1

    def __post_init__(self) -> None:
        check(0.0 <= self.decay < 1.0, "decay", "a float in [0, 1)", self.decay)
        check(self.warmup_steps >= 0, "warmup_steps", "a non-negative int", self.warmup_steps)
        check(self.update_every_steps >= 1, "update_every_steps", "a positive int", self.update_every_steps)


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    # Optimizer steps between checkpoints.
    every_steps: int = 1000
    # Complete checkpoints kept; older ones are removed after a new one is complete.
    keep_last: int = 3
    # None: `<run_dir>/checkpoints`.
    dir: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.every_steps >= 1, "every_steps", "a positive int", self.every_steps)
        check(self.keep_last >= 1, "keep_last", "a positive int", self.keep_last)


@dataclass
class EvaluationConfig:
    """Periodic evaluation during training with the EMA weights."""

    eval_every_steps: int = 0  # 0: never
    # Captions of the sample grid (base stage with text.encoder_path; else eval-shard captions).
    prompts: list[str] = field(default_factory=list)
    # Grid samples per prompt.
    num_images_per_prompt: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # Eval-shard samples generated for FID and CLIP score at each evaluation (0: grids only).
    num_fid_samples: int = 0
    inception_path: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth (FID)
    clip_path: Optional[str] = None       # a CLIPModel save_pretrained folder (CLIP score)
    # Reference FID statistics (.npz from `data_tools fid-stats`); None: the eval shards' images.
    fid_stats_path: Optional[str] = None
    # Images sampled per rank per network call.
    batch_size: int = 8
    # Sampling noise seed (fixed, so grids of successive evaluations are comparable).
    seed: int = 0
    # SR stages: the earlier stages, in cascade order from base64 (a path, or {path, sampler}).
    # The evaluation then also lifts their samples of the same captions or prompts with the stage
    # under training (evaluation.cascade_conditioning), logged under eval/cascade/.
    cascade_from: list[Union[str, CascadeSourceConfig]] = field(default_factory=list)
    # Evaluate at training.max_steps too (false: a launcher sampling the final export itself skips it).
    at_last_step: bool = True

    def __post_init__(self) -> None:
        self.cascade_from = [CascadeSourceConfig(path=s) if isinstance(s, str) else s for s in self.cascade_from]
        check(self.eval_every_steps >= 0, "eval_every_steps", "a non-negative int", self.eval_every_steps)
        check(self.batch_size >= 1, "batch_size", "a positive int", self.batch_size)
        check(self.num_images_per_prompt >= 1, "num_images_per_prompt", "a positive int",
               self.num_images_per_prompt)
        check(self.num_fid_samples >= 0, "num_fid_samples", "a non-negative int", self.num_fid_samples)


@dataclass
class LoggingConfig:
    """Weights & Biases and console logging."""

    # online: stream to wandb.ai (needs WANDB_API_KEY or `wandb login`); offline: write <run_dir>/wandb for `wandb sync`; disabled: metrics.jsonl only.
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    # W&B project the run is logged to.
    wandb_project: str = "imagen-train"
    # W&B team or user name (None: your default entity).
    wandb_entity: Optional[str] = None
    # W&B display name (None: W&B picks one).
    run_name: Optional[str] = None
    # A tqdm bar on rank 0 (off in logs of batch jobs, if you like).
    progress_bar: bool = True


@dataclass
class Config:
    """A whole training run of one stage."""

    # Which stage of the cascade this run trains: base64, sr256 or sr1024.
    stage: StageName = "base64"
    # The square size the network trains on (sr1024 trains on 256 px crops).
    train_resolution: Optional[int] = None
    # Where the run writes (checkpoints, metrics, the resolved config). None: `runs/<name of the
    # config file>` when loaded from a file (configs/sr256-400m.yaml -> runs/sr256-400m), else
    # `runs/<stage>`.
    run_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Old key -> new key: an old key in a YAML file or an override is refused with the new name;
    # configs stored by earlier versions (checkpoints, exports) are read with it renamed.
    renamed_keys: ClassVar[dict[str, str]] = {"schedule": "lr_schedule"}

    def __post_init__(self) -> None:
        spec = get_stage(self.stage)
        if self.run_dir is None:
            self.run_dir = f"runs/{self.stage}"
        if self.train_resolution is None:
            self.train_resolution = spec.train_resolution
        res = self.train_resolution
        check(res >= 8 and res % (2 ** (len(self.model.channel_mult) - 1)) == 0, "train_resolution",
               f"an int >= 8 divisible by 2^(levels-1) = {2 ** (len(self.model.channel_mult) - 1)}", res)
        check(self.model.kind == spec.kind, "model.kind", f"'{spec.kind}' for stage {self.stage}",
               self.model.kind)
        check(res <= spec.output_resolution, "train_resolution",
               f"at most {spec.output_resolution} for stage {self.stage}", res)
        earlier = STAGE_NAMES[:STAGE_NAMES.index(self.stage)]
        check(not self.evaluation.cascade_from or len(self.evaluation.cascade_from) == len(earlier),
              "evaluation.cascade_from", f"one entry per earlier stage of {self.stage}: {list(earlier)}",
              [s.path for s in self.evaluation.cascade_from])

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
