"""Decoded samples and batches: the one path from shard bytes to what a network is given.

Every reader of samples goes through here: the training loader (`decode` and `collate`, on its
own resumable raw stream), periodic evaluation (`read_samples` + `collate`), `fid-stats` and the
quickstart (`iter_samples`, images only) and the data tools (`iter_shard_samples`, raw entries).

    spec = SampleSpec.from_config(cfg, random_crop=False)
    samples = read_samples(cfg.data.eval_shards, spec, 16, random.Random(0))
    batch = collate(samples, cfg.text.max_length)      # the batch of docs/CONTRACTS.md
"""

from __future__ import annotations

import os
import random
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, TypedDict

import numpy as np
import torch
from torch import Tensor

from imagen_train.data.schema import (EMBED_KEY, EMBED_META_KEY, IMAGE_KEYS, KNOWN_KEYS, TEXT_KEY, SchemaError,
                                      image_key, is_unsafe_key, read_embedding)
from imagen_train.data.shards import expand_shards, iter_raw_samples
from imagen_train.data.transforms import (SkipSample, StageGeometry, decode_image, image_pyramid, pad_embeddings,
                                          to_unit_range)

SkipFn = Callable[[str, str, str], None]  # on_skip(reason, "shard.tar:key", detail)


@dataclass(frozen=True)
class SampleSpec:
    """What `decode` makes of a raw sample.

    Always the image pyramid of `geometry`. With `embed_dim` (> 0) also the caption and its
    precomputed embedding (width `embed_dim`, at most `max_length` tokens), and a sample missing
    either is skipped; with `embed_dim` 0 (raw shards: fid-stats, the quickstart's held-out
    images) no embedding is read and the caption is "" where there is none.
    """

    geometry: StageGeometry
    embed_dim: int = 0
    max_length: int = 0

    @classmethod
    def from_config(cls, cfg: Any, random_crop: Optional[bool] = None) -> "SampleSpec":
        """The spec of `cfg.stage`'s training samples; `random_crop` overrides `data.random_crop`,
        for the deterministic readers (evaluation, tools), which also read the low-res input
        unblurred (`data.lowres_blur_max_px` is a training augmentation)."""
        geo = StageGeometry.from_config(cfg)
        if random_crop is not None:
            geo = replace(geo, random_crop=random_crop, lowres_blur_max_px=0.0)
        return cls(geo, cfg.text.embed_dim, cfg.text.max_length)

    @classmethod
    def images(cls, resolution: int) -> "SampleSpec":
        """Center crops of `resolution` px of any image, however small; no text is required."""
        return cls(StageGeometry(resolution, resolution, None, 0, False))

    def keep(self, ext: str) -> bool:
        """Which tar entries are read: those `decode` uses, plus pickle formats so that they can
        be refused (never decoded) when text is read."""
        if self.embed_dim:
            return ext in KNOWN_KEYS or is_unsafe_key(ext)
        return ext in IMAGE_KEYS or ext == TEXT_KEY


@dataclass
class Sample:
    """One decoded sample (uint8 images: one float conversion per batch is far cheaper)."""

    key: str                        # "<shard file name>:<sample key>"
    image: Tensor                   # (3, T, T) uint8
    caption: str
    emb: Optional[np.ndarray]       # (n, D) float16, n <= max_length; None without an embed_dim
    lowres: Optional[Tensor] = None  # (3, t, t) uint8, SR stages


class Batch(TypedDict, total=False):
    """A collated batch; docs/CONTRACTS.md ("data") documents every key, and a test checks it."""

    image: Tensor       # (B, 3, T, T) float32 in [-1, 1]
    lowres: Tensor      # (B, 3, t, t) float32 in [-1, 1], SR stages only
    text_emb: Tensor    # (B, L, D) float16, zero-padded
    text_mask: Tensor   # (B, L) bool, True = real token
    caption: list[str]
    key: list[str]
    _state: dict[str, Any]  # the training loader's: its worker's stream position after this batch


def _text(raw: dict[str, Any], spec: SampleSpec) -> tuple[str, Optional[np.ndarray]]:
    """(caption, embedding (n, D) float16 or None) of a raw sample, or raise SkipSample."""
    txt = raw.get(TEXT_KEY)
    if not spec.embed_dim:
        return ("" if txt is None else txt.decode("utf-8", "replace").strip()), None
    if txt is None:
        raise SkipSample("no_caption")
    try:
        caption = txt.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("no_caption", "caption is not UTF-8") from None
    if EMBED_KEY not in raw:
        raise SkipSample("no_embedding")
    try:
        emb, _ = read_embedding(raw.get(EMBED_KEY), raw.get(EMBED_META_KEY))
    except SchemaError as err:
        raise SkipSample("bad_embedding", str(err)) from None
    if emb.shape[1] != spec.embed_dim:
        raise SkipSample("wrong_embed_dim", f"{emb.shape[1]} != text.embed_dim {spec.embed_dim}")
    if emb.shape[0] == 0 or not np.isfinite(emb).all():
        raise SkipSample("bad_embedding", "empty or non-finite")
    # The embedding stays (n, D) float16 here; `collate` pads the whole batch at once.
    return caption, emb[:spec.max_length]


def decode(raw: dict[str, Any], spec: SampleSpec, rng: random.Random) -> Sample:
    """One raw tar sample -> Sample, or raise SkipSample (its `reason` is the skip counter).

    `rng` draws the random crop and the SR patch position (the loader keys one per sample).
    Text is checked before the image is decoded, so a sample without text costs no decode.
    """
    unsafe = sorted(k for k in raw if not k.startswith("__") and is_unsafe_key(k))
    if unsafe:  # the bytes were read, never decoded: a pickle is never loaded
        raise SkipSample("unsafe_entry", f"carries {', '.join('.' + k for k in unsafe)} (pickle formats "
                                         f"are refused)")
    ext = image_key(raw)
    if ext is None:
        raise SkipSample("no_image")
    caption, emb = _text(raw, spec)
    img = decode_image(raw[ext], spec.geometry.min_image_size, spec.geometry.output_resolution)
    image, lowres = image_pyramid(img, spec.geometry, rng)
    return Sample(f"{os.path.basename(raw['__url__'])}:{raw['__key__']}", image, caption, emb, lowres)


def collate(samples: list[Sample], max_length: int, pad_to_longest: bool = True) -> Batch:
    """Samples with text -> the batch of docs/CONTRACTS.md (without the loader's `_state`).

    Text is padded to the longest caption rounded up to 8 tokens (at most `max_length`), or to
    `max_length` without `pad_to_longest` (`transforms.pad_embeddings`).
    """
    batch = Batch(image=to_unit_range(torch.stack([s.image for s in samples])))
    if samples[0].lowres is not None:
        batch["lowres"] = to_unit_range(torch.stack([s.lowres for s in samples]))
    batch["text_emb"], batch["text_mask"] = pad_embeddings([s.emb for s in samples], max_length, pad_to_longest)
    batch["caption"] = [s.caption for s in samples]
    batch["key"] = [s.key for s in samples]
    return batch


def iter_shard_samples(shards: str | list[str], keep: Optional[Callable[[str], bool]] = None,
                       on_error: Optional[Callable[[str, str, str], None]] = None, retries: int = 0,
                       backoff_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Raw samples (`{"__key__", "__url__", ext: bytes}`) of every shard a spec names, in order
    (`shards.iter_raw_samples` for the arguments; `__url__` says which shard)."""
    for url in expand_shards(shards):
        with closing(iter_raw_samples(url, on_error, keep, retries, backoff_s)) as stream:
            yield from stream


def iter_samples(shards: str | list[str], spec: SampleSpec, rng: Optional[random.Random] = None,
                 on_skip: Optional[SkipFn] = None) -> Iterator[Sample]:
    """Decoded samples of every shard a spec names, in shard and tar order; undecodable ones
    are skipped (reported to `on_skip(reason, name, detail)`). `rng`: see `decode`."""
    rng = rng or random.Random(0)  # draws nothing for center crops of the whole image
    with closing(iter_shard_samples(shards, keep=spec.keep)) as stream:
        for raw in stream:
            try:
                yield decode(raw, spec, rng)
            except SkipSample as err:
                if on_skip is not None:
                    on_skip(err.reason, f"{raw['__url__']}:{raw['__key__']}", err.detail)


def read_samples(shards: str | list[str], spec: SampleSpec, n: int, rng: Optional[random.Random] = None,
                 on_skip: Optional[SkipFn] = None) -> list[Sample]:
    """The first `n` decodable samples (fewer if the shards hold fewer); the shard being read is
    closed at once (a `pipe:` command stopped)."""
    out: list[Sample] = []
    if n <= 0:
        return out
    with closing(iter_samples(shards, spec, rng, on_skip)) as stream:
        for sample in stream:
            out.append(sample)
            if len(out) >= n:
                break
    return out
