"""Shard reading, per-stage transforms and the resumable training loader."""

from imagen_train.data.loader import TrainLoader, build_train_loader
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, EMBED_SCHEMA_VERSION
from imagen_train.data.shards import expand_shards, iter_raw_samples

__all__ = ["TrainLoader", "build_train_loader", "expand_shards", "iter_raw_samples",
           "EMBED_KEY", "EMBED_META_KEY", "EMBED_SCHEMA_VERSION"]
