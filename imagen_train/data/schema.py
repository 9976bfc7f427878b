"""The on-disk sample schema that `data_tools` writes and the loader reads.

A shard is a webdataset tar (plain POSIX tar). Each sample is the group of members that share a
key (the member name up to the first dot of its basename), with img2dataset-compatible entries:

    <key>.jpg | .jpeg | .png | .webp   the image, encoded bytes, any size
    <key>.txt                          the caption, UTF-8
    <key>.json                         free metadata (img2dataset style: key, caption, width, ...)

`precompute-embeddings` adds two entries to every sample and keeps all the others byte for byte:

    <key>.t5.npy    float16 array of shape [n_tokens, D]: the text encoder's last hidden state for
                    the caption's valid tokens only (EOS included, no padding). NumPy `.npy`
                    format, read with `allow_pickle=False`; never a pickle.
    <key>.t5.json   {"schema": "imagen-train/text-embedding", "version": 1, "n_tokens": int,
                     "dim": int, "dtype": "float16", "max_length": int, "encoder": str,
                     "truncated": bool}

The loader truncates the embedding to `cfg.text.max_length` tokens, pads each batch with zeros
to its longest caption rounded up to 8 tokens (or to `max_length` without `text.pad_to_longest`),
keeps it float16 and builds the boolean mask (data/samples.py `collate`, docs/CONTRACTS.md). A sample whose `t5.json` names another schema or version, whose array is not
2-D float16 of `n_tokens` rows, or whose width differs from `cfg.text.embed_dim` is skipped and
counted. Bump `EMBED_SCHEMA_VERSION` with any incompatible change and teach `read_embedding`
the old versions.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

EMBED_SCHEMA = "imagen-train/text-embedding"
EMBED_SCHEMA_VERSION = 1
EMBED_KEY = "t5.npy"
EMBED_META_KEY = "t5.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEY = "txt"
META_KEY = "json"
# Everything the loader will ever decode; any other entry is carried as bytes or dropped.
KNOWN_KEYS = IMAGE_KEYS + (TEXT_KEY, META_KEY, EMBED_KEY, EMBED_META_KEY)
# Entries that other readers (webdataset's default decoders, torch.load) would unpickle, i.e.
# run code from. We never decode them; a sample carrying one is skipped and reported.
UNSAFE_SUFFIXES = ("pickle", "pkl", "pyd", "pth", "pt")


def is_unsafe_key(ext: str) -> bool:
    """Whether an entry's extension (e.g. `pyd`, `meta.pickle`) names a pickle-based format."""
    return ext.rsplit(".", 1)[-1].lower() in UNSAFE_SUFFIXES


class SchemaError(ValueError):
    """A sample's entries do not follow the schema; the message says which and why."""


def encode_embedding(emb: np.ndarray, *, max_length: int, encoder: str, truncated: bool) -> dict[str, bytes]:
    """The two tar entries (`t5.npy`, `t5.json`) for one caption's valid-token embedding (n, D)."""
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    if emb.ndim != 2:
        raise SchemaError(f"embedding must be 2-D [n_tokens, D], got shape {emb.shape}")
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    meta = {"schema": EMBED_SCHEMA, "version": EMBED_SCHEMA_VERSION, "n_tokens": int(emb.shape[0]),
            "dim": int(emb.shape[1]), "dtype": "float16", "max_length": int(max_length),
            "encoder": str(encoder), "truncated": bool(truncated)}
    return {EMBED_KEY: buf.getvalue(), EMBED_META_KEY: json.dumps(meta).encode()}


def read_embedding(npy: bytes | None, meta: bytes | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode and check a sample's embedding entries; returns ((n_tokens, D) float16, meta)."""
    if npy is None:
        raise SchemaError(f"missing {EMBED_KEY}")
    if meta is None:
        raise SchemaError(f"missing {EMBED_META_KEY}")
    try:
        info = json.loads(meta)
    except (ValueError, UnicodeDecodeError) as err:
        raise SchemaError(f"{EMBED_META_KEY} is not JSON: {err}") from None
    if not isinstance(info, dict) or info.get("schema") != EMBED_SCHEMA:
        raise SchemaError(f"{EMBED_META_KEY} does not name schema {EMBED_SCHEMA!r}")
    if info.get("version") != EMBED_SCHEMA_VERSION:
        raise SchemaError(f"embedding schema version {info.get('version')!r} is not "
                          f"{EMBED_SCHEMA_VERSION}; re-run precompute-embeddings")
    try:
        emb = np.load(io.BytesIO(npy), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any malformed .npy is a schema error
        raise SchemaError(f"{EMBED_KEY} is not a readable .npy: {err}") from None
    if emb.dtype != np.float16 or emb.ndim != 2:
        raise SchemaError(f"{EMBED_KEY} must be float16 [n_tokens, D], got {emb.dtype} {emb.shape}")
    if emb.shape[0] != info.get("n_tokens") or emb.shape[1] != info.get("dim"):
        raise SchemaError(f"{EMBED_KEY} shape {emb.shape} disagrees with {EMBED_META_KEY} "
                          f"(n_tokens={info.get('n_tokens')}, dim={info.get('dim')})")
    return emb, info


def image_key(sample: dict[str, Any]) -> str | None:
    """The first image entry present in a raw sample, or None."""
    for ext in IMAGE_KEYS:
        if ext in sample:
            return ext
    return None
