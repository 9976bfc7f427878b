"""The inference pipeline's typed config (configs/inference_pipeline.yaml), after NeMo's
`inference_pipeline.yaml`: which stages run, their checkpoints, samplers and precision.

Loaded with the training config's machinery (`base:` inheritance, dotted `--set` overrides,
errors naming the key and the file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from imagen_train.config import STAGES, ConfigError, SamplerConfig, check, load_dataclass
from imagen_train.stages import STAGES as STAGE_REGISTRY, stages_for

# target_resolution -> the stages that run, in order; from the stage registry.
RESOLUTION_STAGES = {spec.output_resolution: stages_for(spec.output_resolution) for spec in STAGE_REGISTRY.values()}


@dataclass
class StageCheckpoints:
    """Per stage: an exported .safetensors file, a training checkpoint folder (step_N), or a
    checkpoints root (its `latest` is used). Only the stages `target_resolution` needs are read."""

    base64: Optional[str] = None  # the 64 px base stage
    sr256: Optional[str] = None   # the 64 -> 256 stage
    sr1024: Optional[str] = None  # the 256 -> 1024 stage


@dataclass
class StageSamplers:
    """Sampler settings per stage (reference: EDM Heun; base 30 steps cfg 7.5, SR256 20 steps
    cfg 8, SR1024 20 steps cfg 7.5; SR noise-augmentation level near 0 as NeMo's sigma 0.002)."""

    base64: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=30, guidance_scale=7.5))
    sr256: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20, guidance_scale=8.0))
    sr1024: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20, guidance_scale=7.5))


@dataclass
class SweepConfig:
    """launch/evaluate.py: FID and CLIP score over a sweep of guidance scales.

    The sweep samples up to `resolution` (not the pipeline's `target_resolution`) and
    `images_per_caption` images per caption (not `num_images_per_prompt`): the reference
    protocol, FID-30K at 256 px, draws one image for each of 30,000 captions.
    """

    captions_file: Optional[str] = None   # one caption a line (e.g. 30k COCO val captions)
    max_captions: int = 0                 # 0: all
    # The sweep samples up to this size; only the stages it needs run.
    resolution: Literal[tuple(RESOLUTION_STAGES)] = 256  # type: ignore[valid-type]
    # Images sampled per caption (FID-30K: 30,000 captions, one image each).
    images_per_caption: int = 1
    # One row of the table per scale, the same scale at every stage (NeMo's FID-CLIP curve).
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    fid_stats_path: Optional[str] = None  # .npz from `python -m data_tools fid-stats`
    inception_path: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth
    clip_path: Optional[str] = None       # a CLIPModel save_pretrained folder
    # Images per Inception / CLIP forward.
    feature_batch_size: int = 32
    # Also write every sampled image, <out>/images/g<scale>/NNNNN.png.
    save_images: bool = False

    def __post_init__(self) -> None:
        check(len(self.guidance_scales) >= 1 and all(s >= 0 for s in self.guidance_scales),
               "guidance_scales", "a non-empty list of non-negative floats", self.guidance_scales)
        check(self.max_captions >= 0, "max_captions", "a non-negative int", self.max_captions)
        check(self.images_per_caption >= 1, "images_per_caption", "a positive int", self.images_per_caption)
        check(self.feature_batch_size >= 1, "feature_batch_size", "a positive int", self.feature_batch_size)


@dataclass
class InferencePipelineConfig:
    """The cascade: text -> 64 px -> 256 px -> 1024 px, up to `target_resolution`."""

    # launch/sample.py: images per prompt (the sweep uses evaluation.images_per_caption).
    num_images_per_prompt: int = 4
    # launch/sample.py: the size sampled to; only the stages it needs run (the sweep: evaluation.resolution).
    target_resolution: Literal[tuple(RESOLUTION_STAGES)] = 1024  # type: ignore[valid-type]
    checkpoints: StageCheckpoints = field(default_factory=StageCheckpoints)
    run_ema_model: bool = True            # False: the raw weights (`raw.` in an export)
    # auto: bf16 weights on a GPU with bf16 (else fp16 for fp16-trained weights, else fp32), fp32
    # on a CPU; bf16: bf16 anywhere; 16: fp16 weights on a GPU (output checked for overflow), bf16
    # on a CPU (no fp16 convolutions there); 32: fp32; AMP: fp32 weights under autocast (fp16 on a
    # GPU, bf16 on a CPU). cascade.Precision.
    inference_precision: Literal["auto", "bf16", 16, 32, "AMP"] = "auto"
    # How the sampler calls each network: eager; compile (torch.compile of the whole network, at
    # the first batch); cuda_graphs (GPU: replayed from CUDA graphs captured per batch shape, which
    # removes the launch cost of ~700 kernels per call at small batch). cascade.network_call.
    network_call: Literal["eager", "compile", "cuda_graphs"] = "eager"
    dynamic_thresholding: bool = True     # False: static clamp of x0 to [-1, 1]
    # Prompts to sample (launch/sample.py).
    texts: list[str] = field(default_factory=list)
    prompts_file: Optional[str] = None    # one prompt a line; appended to `texts`
    # Where launch/sample.py writes images/, grids/ and settings.json.
    output_path: str = "outputs/samples"
    encoder_path: Optional[str] = None    # T5 save_pretrained folder
    samplers: StageSamplers = field(default_factory=StageSamplers)
    # Sampling noise seed.
    seed: int = 0
    batch_size: int = 8                   # images per network call (x2 with guidance)
    device: str = "auto"                  # auto: cuda if available, else cpu
    evaluation: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        check(self.num_images_per_prompt >= 1, "num_images_per_prompt", "a positive int",
               self.num_images_per_prompt)
        check(self.batch_size >= 1, "batch_size", "a positive int", self.batch_size)
        check(not (self.network_call == "cuda_graphs" and self.inference_precision == "AMP"), "network_call",
              "eager or compile with inference_precision AMP (autocast's weight casts are not captured in a "
              "CUDA graph)", self.network_call)
        for stage in self.stages:
            check(getattr(self.checkpoints, stage) is not None, f"checkpoints.{stage}",
                   f"a checkpoint path (target_resolution {self.target_resolution} runs stage {stage})", None)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages that run for `target_resolution`, in order."""
        return RESOLUTION_STAGES[self.target_resolution]

    def sampler_for(self, stage: str) -> SamplerConfig:
        """The stage's sampler with `dynamic_thresholding` applied."""
        sampler = getattr(self.samplers, stage)
        return dataclasses.replace(sampler, thresholding="dynamic" if self.dynamic_thresholding else "static")

    def prompts(self) -> list[str]:
        """`texts` then the lines of `prompts_file` (blank lines skipped)."""
        texts = list(self.texts)
        if self.prompts_file:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise ConfigError("prompts_file", "an existing text file", self.prompts_file)
            texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return texts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_pipeline_config(path: str | Path, overrides: Optional[list[str]] = None) -> InferencePipelineConfig:
    """Read the pipeline YAML (with `base:`), apply dotted overrides, validate."""
    return load_dataclass(path, InferencePipelineConfig, overrides)


__all__ = ["InferencePipelineConfig", "StageCheckpoints", "StageSamplers", "SweepConfig",
           "load_pipeline_config", "RESOLUTION_STAGES", "STAGES"]
