"""The stage registry: the one place that says what each stage of the cascade is.

Imagen's cascade (Saharia et al. 2022, section 2) is a 64 px base model and two super-resolution
models, 64 -> 256 and 256 -> 1024; the 1024 px model trains on 256 px crops of its output
(section 4.1). The config schema, the model builder and the inference pipeline all read these
facts from here. Imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

NetworkKind = Literal["unet", "efficient_unet"]


@dataclass(frozen=True)
class Stage:
    """One stage's fixed facts; a config's `train_resolution` may still pick a smaller crop."""

    name: str
    output_resolution: int          # px of the square the stage produces at inference
    train_resolution: int           # px of the square the network trains on by default
    lowres_factor: Optional[int]    # output / low-res conditioning size; None for the base stage
    kind: NetworkKind               # the network: the base UNet or the Efficient U-Net
    tiny_preset: str                # configs/<tiny_preset>.yaml: the CPU flavour for tests

    @property
    def is_super_resolution(self) -> bool:
        """True for a stage conditioned on a low-res image."""
        return self.lowres_factor is not None

    @property
    def input_resolution(self) -> Optional[int]:
        """Size of the low-res image the stage takes at inference (None for the base stage)."""
        return self.output_resolution // self.lowres_factor if self.lowres_factor else None

    def lowres_resolution(self, train_resolution: int) -> Optional[int]:
        """Size of the low-res conditioning crop for a `train_resolution` crop (None: base)."""
        return train_resolution // self.lowres_factor if self.lowres_factor else None


# In cascade order: each stage after the first upsamples the output of the one before it.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("base64", output_resolution=64, train_resolution=64, lowres_factor=None, kind="unet",
          tiny_preset="base64-tiny"),
    Stage("sr256", output_resolution=256, train_resolution=256, lowres_factor=4, kind="efficient_unet",
          tiny_preset="sr256-tiny"),
    Stage("sr1024", output_resolution=1024, train_resolution=256, lowres_factor=4, kind="efficient_unet",
          tiny_preset="sr1024-tiny"),
)}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
# The config field's type, built from the registry so that a new stage needs no second edit.
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]


def get_stage(name: str) -> Stage:
    """The registry entry for `name`; ValueError naming the known stages otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
    return STAGES[name]


def stages_for(resolution: int) -> tuple[str, ...]:
    """The stages that run, in order, to produce `resolution` px images (64 -> base64 only)."""
    names = []
    for stage in STAGES.values():
        names.append(stage.name)
        if stage.output_resolution == resolution:
            return tuple(names)
    known = ", ".join(str(s.output_resolution) for s in STAGES.values())
    raise ValueError(f"no stage produces {resolution} px; the cascade produces {known}")
