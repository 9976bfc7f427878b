"""Checks that refuse a run before any process group, network or engine is built.

Each error names the setting, file or folder at fault, so a job that cannot work fails in
seconds at start instead of an hour into a multi-node run.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagen_train.config import Config, ConfigError
from imagen_train.data import expand_shards, iter_raw_samples
from imagen_train.data.preflight import check_shards
from imagen_train.training import engine, speed
from imagen_train.utils import dist


def checkpoint_root(cfg: Config) -> Path:
    """Where the run's checkpoints go: `checkpoint.dir`, or `<run_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run_dir) / "checkpoints"


def _has_a_sample(url: str) -> bool:
    return next(iter_raw_samples(url, keep=lambda ext: False), None) is not None


def preflight(cfg: Config, world_size: int) -> None:
    """Refuse a run that cannot work before any process group or model is built.

    Checks that the batch sizes divide over the ranks, builds a compiled optimizer op if the
    config asks for one, checks that the shard spec names existing shards, and that every
    folder the run writes to is writable.
    """
    cfg.training.grad_accum_for(world_size)  # refuses batch sizes that do not divide over the ranks
    engine.build_optimizer_op(cfg)  # a compiled optimizer op builds (or fails) before any data work
    spec = cfg.data.train_shards
    if not spec:
        raise ConfigError("data.train_shards", "a shard pattern, list file or path", spec)
    try:
        urls = expand_shards(spec)
    except (ValueError, OSError) as err:
        raise ConfigError("data.train_shards", "a valid shard spec", f"{spec} ({err})") from None
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or (local and len(missing) == len(local)):
        raise ConfigError("data.train_shards", "a spec that matches existing shards",
                          f"{spec} (no file found; first tried: {missing[0] if missing else spec})")
    if missing:
        raise ConfigError("data.train_shards", "only existing shards",
                          f"{len(missing)} of {len(local)} missing, e.g. {missing[0]}")
    if local and not any(_has_a_sample(u) for u in local):
        raise ConfigError("data.train_shards", "shards holding samples",
                          f"{spec} ({len(local)} shard(s), no sample in any)")
    check_shards(cfg, urls)  # embedding schema and width, captions, image size of a few shards
    if cfg.text.encoder_path and not Path(cfg.text.encoder_path).exists():
        raise ConfigError("text.encoder_path", "an existing encoder folder", cfg.text.encoder_path)
    if cfg.training.compile:
        speed.check_compile()
    if dist.rank() == 0:
        ckpt_dir = checkpoint_root(cfg)
        for key, folder in (("run_dir", Path(cfg.run_dir)), ("checkpoint.dir", ckpt_dir)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as err:
                raise ConfigError(key, "a writable folder", f"{folder} ({err.strerror})") from None
