"""`inspect` (counts, keys, caption lengths, embedding shapes) and `verify` (decode everything).

`verify` decodes every image fully, requires a caption, and checks every embedding against the
schema (float16 [n_tokens, D], n_tokens as recorded, finite, one width across the set, and
`--embed-dim` if given). A shard with no samples is bad, and so is one whose count differs from
its `precompute-embeddings` record. With `--inputs` (the shards precompute read) every input
must have its output shard and record, and the output must hold every input sample the record
does not name as skipped. It names each bad shard or sample and exits 1 if there is any.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from collections import Counter
from typing import Any, Optional

import numpy as np
from PIL import Image

from data_tools.common import Timer, progress, rate
from data_tools.precompute import output_names, read_record, record_path
from imagen_train.data.schema import EMBED_KEY, EMBED_META_KEY, SchemaError, image_key, read_embedding
from imagen_train.data.samples import iter_shard_samples
from imagen_train.data.shards import expand_shards, iter_raw_samples


def _stats(values: list[float]) -> Optional[dict[str, float]]:
    if not values:
        return None
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


def inspect_shards(shards: str, progress_bar: bool = True) -> dict[str, Any]:
    """Counts, entry keys, caption lengths, image sizes (headers only) and embedding shapes."""
    urls = expand_shards(shards)
    timer = Timer()
    keys: Counter[str] = Counter()
    bad_shards: list[str] = []
    cap_chars, cap_words, sides, n_tokens = [], [], [], []
    dims: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    per_shard = dict.fromkeys(urls, 0)
    with progress(None, "inspect", progress_bar) as bar:
        for s in iter_shard_samples(urls, on_error=lambda u, k, m: bad_shards.append(f"{u}:{k} {m}")):
            per_shard[s["__url__"]] += 1
            keys.update(k for k in s if not k.startswith("__"))
            if "txt" in s:
                text = s["txt"].decode("utf-8", "replace")
                cap_chars.append(len(text))
                cap_words.append(len(text.split()))
            ext = image_key(s)
            if ext:
                try:
                    with Image.open(io.BytesIO(s[ext])) as img:  # header only
                        sides.append(min(img.size))
                        formats[str(img.format)] += 1
                except Exception:  # noqa: BLE001
                    formats["unreadable"] += 1
            if EMBED_KEY in s:
                try:
                    arr = np.load(io.BytesIO(s[EMBED_KEY]), allow_pickle=False)
                    n_tokens.append(arr.shape[0])
                    dims[str(arr.shape[1:])] += 1
                    dtypes[str(arr.dtype)] += 1
                except Exception:  # noqa: BLE001
                    dtypes["unreadable"] += 1
            bar.update()
    total = sum(per_shard.values())
    return {"command": "inspect", "shards": len(urls), "samples": total, "samples_per_shard": per_shard,
            "keys": dict(keys), "caption_chars": _stats(cap_chars), "caption_words": _stats(cap_words),
            "image_formats": dict(formats), "image_min_side": _stats(sides),
            "embedding_tokens": _stats(n_tokens), "embedding_shapes_after_tokens": dict(dims),
            "embedding_dtypes": dict(dtypes), "bad_shards": bad_shards,
            "seconds": round(timer.seconds, 2), "samples_per_s": rate(total, timer.seconds)}


def _check_sample(s: dict[str, Any], require_embedding: bool) -> tuple[Optional[str], Optional[int]]:
    """(problem or None, embedding width or None) for one raw sample."""
    ext = image_key(s)
    if ext is None:
        return "no image entry", None
    try:
        with Image.open(io.BytesIO(s[ext])) as img:
            img.load()
    except Exception as err:  # noqa: BLE001
        return f"image does not decode: {err}", None
    if not s.get("txt", b"").decode("utf-8", "replace").strip():
        return "no caption", None
    if EMBED_KEY not in s and EMBED_META_KEY not in s:
        return ("no embedding" if require_embedding else None), None
    try:
        emb, _ = read_embedding(s.get(EMBED_KEY), s.get(EMBED_META_KEY))
    except SchemaError as err:
        return f"bad embedding: {err}", None
    if emb.shape[0] == 0:
        return "embedding has no tokens", None
    if not np.isfinite(emb).all():
        return "embedding is not finite", None
    return None, int(emb.shape[1])


def check_counts(counts: dict[str, int]) -> list[dict[str, str]]:
    """Shards that hold no samples, or another number than their precompute record says."""
    bad = []
    for url, count in counts.items():
        record = read_record(url) if "://" not in url and not url.startswith("pipe:") else None
        if count == 0:
            bad.append({"sample": url, "problem": "shard holds no samples"})
        elif record is not None and record.get("output_samples") != count:
            bad.append({"sample": url, "problem": f"shard holds {count} samples, its record "
                                                  f"{record_path(url).name} says {record.get('output_samples')}"})
    return bad


def check_against_inputs(counts: dict[str, int], inputs: list[str]) -> list[dict[str, str]]:
    """Every input shard has its output shard and record, and the output holds every input sample
    the record does not name as skipped (re-reading each input's member names, not its data)."""
    by_name = {Path(url).name: url for url in counts}
    bad = []
    for url, name in zip(inputs, output_names(inputs)):
        out = by_name.get(name)
        if out is None:
            bad.append({"sample": url, "problem": f"input shard has no output shard {name} among --shards"})
            continue
        record = read_record(out)
        if record is None:
            bad.append({"sample": out, "problem": f"no precompute record ({record_path(out).name}) for input {url}"})
            continue
        errors: list[str] = []
        held = sum(1 for _ in iter_raw_samples(url, on_error=lambda u, k, m: errors.append(m),
                                               keep=lambda ext: False))
        skipped = sum(record.get("skipped", {}).values())
        if errors:
            bad.append({"sample": url, "problem": f"input shard cannot be read to compare: {errors[0]}"})
        elif record.get("input_samples") != held:
            bad.append({"sample": out, "problem": f"its record covers {record.get('input_samples')} input "
                                                  f"samples; input {url} holds {held}"})
        elif counts[out] < held - skipped:
            bad.append({"sample": out, "problem": f"shortfall: {counts[out]} samples; input {url} holds "
                                                  f"{held}, of which the record skipped {skipped}"})
    return bad


def verify_shards(shards: str, embed_dim: Optional[int] = None, require_embeddings: bool = False,
                  progress_bar: bool = True, inputs: Optional[str] = None) -> dict[str, Any]:
    """Decode every image and check every embedding; `ok` is False if anything is bad."""
    urls = expand_shards(shards)
    timer = Timer()
    bad: list[dict[str, str]] = []
    widths: Counter[int] = Counter()
    width_of: dict[str, int] = {}
    counts = dict.fromkeys(urls, 0)
    total = 0

    def on_error(url: str, key: str, message: str) -> None:
        bad.append({"sample": f"{url}:{key}" if key else url, "problem": message})

    with progress(None, "verify", progress_bar) as bar:
        for s in iter_shard_samples(urls, on_error=on_error):
            total += 1
            counts[s["__url__"]] += 1
            sid = f"{s['__url__']}:{s['__key__']}"
            problem, width = _check_sample(s, require_embeddings)
            if problem:
                bad.append({"sample": sid, "problem": problem})
            elif width is not None:
                widths[width] += 1
                width_of[sid] = width
            bar.update()
    expected = embed_dim if embed_dim is not None else (widths.most_common(1)[0][0] if widths else None)
    for sid, width in width_of.items():
        if width != expected:
            bad.append({"sample": sid, "problem": f"embedding width {width} != {expected}"})
    bad += check_counts(counts)
    if inputs:
        bad += check_against_inputs(counts, expand_shards(inputs))
    return {"command": "verify", "ok": not bad, "shards": len(urls), "samples": total,
            "inputs_checked": len(expand_shards(inputs)) if inputs else 0,
            "embedding_widths": {str(k): v for k, v in widths.items()}, "num_bad": len(bad), "bad": bad,
            "seconds": round(timer.seconds, 2), "samples_per_s": rate(total, timer.seconds)}


def add_parsers(sub: Any) -> None:
    """Register the `inspect` and `verify` subcommands."""
    p = sub.add_parser("inspect", help="counts, keys, caption lengths, embedding shapes and dtypes",
                       description=__doc__)
    p.add_argument("--shards", required=True, help="brace pattern, list file or `::`-joined shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: inspect_shards(a.shards, not a.no_progress))
    p = sub.add_parser("verify", help="decode every image and check every embedding; exit 1 if bad",
                       description=__doc__)
    p.add_argument("--shards", required=True, help="brace pattern, list file or `::`-joined shards")
    p.add_argument("--embed-dim", type=int, default=None, help="required embedding width (default: the common one)")
    p.add_argument("--require-embeddings", action="store_true", help="a sample without an embedding is bad")
    p.add_argument("--inputs", default=None,
                   help="the shards precompute-embeddings read: each must have its output among --shards, "
                        "holding every sample its record does not name as skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: verify_shards(a.shards, a.embed_dim, a.require_embeddings, not a.no_progress,
                                                a.inputs))
