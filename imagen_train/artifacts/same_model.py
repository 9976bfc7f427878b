"""Whether a checkpoint holds the network this config builds: resuming another one is refused.

Beside `checkpoints.check_resume_target` (stage, world size): this compares the settings that
decide the network's parameters and what its output means, read from the checkpoint's
config.yaml before anything is loaded. A resumed engine would otherwise fail minutes later on a
shape, or, where the shapes agree (another head width, another parameterization), train on
silently with weights that mean something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imagen_train.config import Config, ConfigError

from .checkpoints import CONFIG_FILE, CheckpointError, read_config

# Model settings that change how the network runs, not what its weights are.
RUNTIME_MODEL_KEYS = ("activation_checkpointing", "dropout")
# Other settings a checkpoint's weights depend on.
NETWORK_KEYS = ("stage", "train_resolution", "text.embed_dim", "diffusion.formulation",
                "diffusion.prediction", "diffusion.schedule", "diffusion.sigma_data")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def network_settings(cfg: Config) -> dict[str, Any]:
    """The dotted settings a checkpoint's weights depend on, with their values."""
    flat = _flat(cfg.to_dict())
    keys = [k for k in flat if k.startswith("model.") and k.split(".", 1)[1] not in RUNTIME_MODEL_KEYS]
    return {k: flat[k] for k in keys + list(NETWORK_KEYS)}


def model_differences(saved: Config, cfg: Config) -> list[str]:
    """`key: <checkpoint's value> in the checkpoint, <this one> here` for each setting that differs."""
    ours, theirs = network_settings(cfg), network_settings(saved)
    return [f"{k}: {theirs[k]!r} in the checkpoint, {ours[k]!r} here" for k in ours if ours[k] != theirs[k]]


def refuse_other_model(folder: Path, cfg: Config) -> None:
    """Refuse resuming `folder` when its config.yaml builds another network than `cfg` (reads that
    file only), naming every key that differs."""
    try:
        saved = read_config(Path(folder))
    except (OSError, yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE} cannot be read: {err}") from None
    differences = model_differences(saved, cfg)
    if differences:
        raise CheckpointError(
            f"{folder} holds another network than this config builds ({'; '.join(differences)}). "
            f"Resume it with its own settings, or start a new run in another run_dir (a config file "
            f"of another name gets its own runs/<name>), or start from its weights with "
            f"training.init_from after exporting them.")
