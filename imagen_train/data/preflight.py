"""A look at a few shards before training: does the data fit this stage's config?

The loader skips a bad sample and counts it, so a shard set that does not fit the run (made with
another text encoder, an old embedding schema, or images too small for the stage) would train on
nothing but skips, or fail an hour in when a worker reaches the odd shards. `check_shards` reads
the first samples of `data.preflight_shards` shards spread over the list (the same ones on every
rank) and raises ConfigError naming the key, the shard and the sample. It reads only headers:
embedding metadata and arrays, and the image size from the image header (no decode).
"""

from __future__ import annotations

import io
from typing import Any, Optional

from PIL import Image

from imagen_train.config import ConfigError
from imagen_train.data.schema import (EMBED_KEY, EMBED_META_KEY, KNOWN_KEYS, SchemaError, TEXT_KEY, image_key,
                                      read_embedding)
from imagen_train.data.shards import iter_raw_samples

SAMPLES_PER_SHARD = 2


def spread(urls: list[str], count: int) -> list[str]:
    """`count` URLs evenly spread over `urls`, first and last included (all if fewer)."""
    if count >= len(urls):
        return list(urls)
    if count == 1:
        return [urls[0]]
    return [urls[round(i * (len(urls) - 1) / (count - 1))] for i in range(count)]


def _first_samples(url: str, n: int, errors: list[str]) -> list[dict[str, Any]]:
    samples = []
    stream = iter_raw_samples(url, lambda u, key, msg: errors.append(f"{u}:{key} {msg}".strip()),
                              keep=lambda ext: ext in KNOWN_KEYS)
    for sample in stream:
        samples.append(sample)
        if len(samples) == n:
            break
    stream.close()  # stop a `pipe:` download early
    return samples


def _image_side(data: bytes) -> Optional[int]:
    try:
        return min(Image.open(io.BytesIO(data)).size)  # the header only
    except Exception:  # noqa: BLE001 - an unreadable image is the loader's to skip and count
        return None


def check_shards(cfg: Any, urls: list[str]) -> None:
    """Raise ConfigError if the sampled shards do not fit `cfg` (embedding width, schema, image size)."""
    count = cfg.data.preflight_shards
    if count <= 0:
        return
    min_side = cfg.data.min_image_size or cfg.output_resolution
    sides: list[tuple[int, str]] = []
    for url in spread(urls, count):
        errors: list[str] = []
        samples = _first_samples(url, SAMPLES_PER_SHARD, errors)
        if not samples:
            raise ConfigError("data.train_shards", "shards holding readable samples",
                              f"{url}: no sample ({errors[0] if errors else 'empty'})")
        for raw in samples:
            name = f"{url}:{raw['__key__']}"
            if EMBED_KEY not in raw:
                raise ConfigError("data.train_shards", "shards with precomputed text embeddings "
                                  "(python -m data_tools precompute-embeddings)", f"{name} has no .{EMBED_KEY}")
            try:
                emb, meta = read_embedding(raw.get(EMBED_KEY), raw.get(EMBED_META_KEY))
            except SchemaError as err:
                raise ConfigError("data.train_shards", "embeddings in this version's schema",
                                  f"{name}: {err}") from None
            if emb.shape[1] != cfg.text.embed_dim:
                raise ConfigError("text.embed_dim", "the width of the shards' embeddings",
                                  f"{cfg.text.embed_dim}, but {name} has width {emb.shape[1]} "
                                  f"(encoder {meta.get('encoder', '?')})")
            if TEXT_KEY not in raw:
                raise ConfigError("data.train_shards", "samples with a caption (.txt)", f"{name} has none")
            ext = image_key(raw)
            if ext is None:
                raise ConfigError("data.train_shards", "samples with an image (.jpg, .png, .webp)",
                                  f"{name} has none")
            side = _image_side(raw[ext])
            if side is not None:
                sides.append((side, name))
    # A few small images are normal (the loader skips them); all of them means a wrong data set.
    if sides and all(side < min_side for side, _ in sides):
        side, name = sides[0]
        raise ConfigError("data.min_image_size", f"shards with images of at least {min_side} px on the "
                          f"smaller side for stage {cfg.stage}, or a lower data.min_image_size",
                          f"every sampled image is smaller, e.g. {name} ({side} px)")
