"""Shard reading, per-stage transforms, decoded samples and batches, and the resumable training loader."""

from imagen_train.data.loader import TrainLoader, build_train_loader
from imagen_train.data.samples import (Batch, Sample, SampleSpec, collate, decode, iter_samples, iter_shard_samples,
                                       read_samples)
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, EMBED_SCHEMA_VERSION
from imagen_train.data.shards import expand_shards, iter_raw_samples
from imagen_train.data.transforms import SkipSample

__all__ = ["Batch", "Sample", "SampleSpec", "SkipSample", "TrainLoader", "build_train_loader", "collate", "decode",
           "expand_shards", "iter_raw_samples", "iter_samples", "iter_shard_samples", "read_samples",
           "EMBED_KEY", "EMBED_META_KEY", "EMBED_SCHEMA_VERSION"]
