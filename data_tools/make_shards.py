"""`make-shards`: images + captions -> webdataset shards with img2dataset-compatible keys.

Inputs: a folder of images with sidecar captions (`photo.jpg` + `photo.txt`, searched
recursively, sorted), or a manifest of (image path, caption) rows as CSV, JSONL or Parquet
(Parquet needs pyarrow). Relative image paths in a manifest are relative to the manifest.
Each sample gets `jpg`/`png`/`webp` (the original bytes, or re-encoded), `txt` and `json`
(key, caption, width, height, original_width, original_height, original_path), in shards
`00000.tar`, `00001.tar`, ...

`--resize S` scales each image so its smaller side is S (bicubic, never up), as the training
loader would; `--center-crop` then cuts the centre S x S square. Images whose smaller side is
below `--min-size` are skipped and named. `--workers` processes decode, resize and encode in
parallel; the output is the same, byte for byte, for any number of them.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from data_tools.common import ShardWriter, Timer, progress, rate

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file")
CAPTION_COLUMNS = ("caption", "text", "txt")
MAX_NAMED = 100  # skipped samples named in the summary per reason


def folder_items(folder: Path) -> list[tuple[str, Optional[str]]]:
    """(image path, caption or None) for every image under `folder`, sorted by path."""
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        side = path.with_suffix(".txt")
        items.append((str(path), side.read_text(encoding="utf-8").strip() if side.is_file() else None))
    return items


def _pick(columns: list[str], wanted: Optional[str], defaults: tuple[str, ...], what: str, src: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{src}: no column {wanted!r} ({what}); columns are {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"{src}: no {what} column (tried {', '.join(defaults)}); columns are {columns}"
                     f" - name it with --{what}-column")


def manifest_items(path: Path, image_column: Optional[str] = None,
                   caption_column: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
    """(image path, caption or None) rows of a CSV, JSONL or Parquet manifest."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fobj:
            rows = list(csv.DictReader(fobj))
    elif suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only Parquet manifests need pyarrow
        except ImportError:
            raise SystemExit(f"{path}: reading Parquet needs pyarrow, which is not installed "
                             "(pip install pyarrow), or convert the manifest to CSV or JSONL") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unknown manifest type {suffix!r} (use .csv, .jsonl or .parquet)")
    if not rows:
        return []
    columns = list(rows[0].keys())
    img_col = _pick(columns, image_column, IMAGE_COLUMNS, "image", path)
    cap_col = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    items = []
    for row in rows:
        img = Path(str(row[img_col]))
        cap = row.get(cap_col)
        cap = str(cap).strip() if cap is not None and str(cap).strip() else None
        items.append((str(img if img.is_absolute() else path.parent / img), cap))
    return items


@dataclass(frozen=True)
class ImageOptions:
    """What make-shards does to each image."""

    reencode: str = "keep"    # keep, jpg or png
    quality: int = 95         # JPEG quality when re-encoding
    min_size: int = 0         # skip images whose smaller side is below this (px)
    resize: int = 0           # scale the smaller side to this (px; never up); 0: keep the size
    center_crop: bool = False  # then cut the centre resize x resize square


def _resized(img: Image.Image, size: int, crop: bool) -> Image.Image:
    """The smaller side scaled to `size` (bicubic, only down, as the loader resizes), then
    optionally the centre size x size square."""
    w, h = img.size
    if min(w, h) > size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC,
                         reducing_gap=None)
        w, h = img.size
    if crop and (w, h) != (size, size):
        side = min(size, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img


def _convert(data: bytes, opts: ImageOptions) -> tuple[str, bytes, int, int, int, int]:
    """(ext, bytes, width, height, original width, original height); raises on an undecodable image."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()  # full decode: a truncated or corrupt file fails here
    w0, h0 = img.size
    if min(w0, h0) < opts.min_size:
        raise _TooSmall()
    changed = bool(opts.resize)
    if changed:
        img = _resized(img, opts.resize, opts.center_crop)
        changed = img.size != (w0, h0)
    w, h = img.size
    if opts.reencode == "keep" and fmt in KEEP_FORMATS and not changed:
        return KEEP_FORMATS[fmt], data, w, h, w0, h0
    # A resized image is written as its source format was (JPEG stays JPEG), unless told otherwise.
    target = opts.reencode if opts.reencode != "keep" else ("jpg" if fmt == "JPEG" else "png")
    buf = io.BytesIO()
    rgb = img.convert("RGB") if target == "jpg" or img.mode not in ("RGB", "RGBA", "L") else img
    rgb.save(buf, format="JPEG" if target == "jpg" else "PNG",
             **({"quality": opts.quality} if target == "jpg" else {}))
    return target, buf.getvalue(), w, h, w0, h0


class _TooSmall(Exception):
    """An image whose smaller side is below --min-size."""


def _prepare(task: tuple[str, ImageOptions]) -> tuple[str, Any]:
    """("ok", converted) or ("too_small" | "bad_image", None) for one image file (in a worker)."""
    path, opts = task
    try:
        return "ok", _convert(Path(path).read_bytes(), opts)
    except _TooSmall:
        return "too_small", None
    except Exception:  # noqa: BLE001 - unreadable file or undecodable image
        return "bad_image", None


def make_shards(out: str | Path, input_dir: Optional[str | Path] = None, manifest: Optional[str | Path] = None,
                shard_size: int = 1000, min_size: int = 0, reencode: str = "keep", quality: int = 95,
                image_column: Optional[str] = None, caption_column: Optional[str] = None,
                progress_bar: bool = True, workers: int = 1, resize: int = 0,
                center_crop: bool = False) -> dict[str, Any]:
    """Write shards from a folder or manifest; returns the summary dict."""
    if (input_dir is None) == (manifest is None):
        raise ValueError("give exactly one of an input folder or a manifest")
    if reencode not in ("keep", "jpg", "png"):
        raise ValueError(f"reencode must be keep, jpg or png, got {reencode}")
    if center_crop and not resize:
        raise ValueError("--center-crop needs --resize SIZE (the square's side)")
    opts = ImageOptions(reencode, quality, min_size, resize, center_crop)
    items = folder_items(Path(input_dir)) if input_dir is not None else \
        manifest_items(Path(manifest), image_column, caption_column)
    timer = Timer()
    skipped: dict[str, list[str]] = {}
    counts: dict[str, int] = {}

    def skip(reason: str, name: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        named = skipped.setdefault(reason, [])
        if len(named) < MAX_NAMED:
            named.append(name)

    captioned = [(path, caption) for path, caption in items if caption is not None]
    for path, caption in items:
        if caption is None:
            skip("no_caption", path)
    writer = ShardWriter(out, shard_size)
    with progress(len(items), "make-shards", progress_bar) as bar, _WorkerPool(workers) as pool:
        bar.update(len(items) - len(captioned))
        tasks = [(path, opts) for path, _ in captioned]
        results = pool.map(_prepare, tasks, chunksize=16) if pool else map(_prepare, tasks)
        for (path, caption), (status, converted) in zip(captioned, results):
            bar.update()
            if status != "ok":
                skip(status, path)
                continue
            ext, data, w, h, w0, h0 = converted
            key = f"{writer.num_samples:09d}"
            meta = {"key": key, "status": "success", "caption": caption, "width": w, "height": h,
                    "original_width": w0, "original_height": h0, "original_path": path}
            writer.write(key, {ext: data, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode()})
    writer.flush()
    return {"command": "make-shards", "out": str(out), "inputs": len(items), "samples": writer.num_samples,
            "shards": len(writer.shards), "skipped": counts, "skipped_samples": skipped, "workers": workers,
            "seconds": round(timer.seconds, 2), "samples_per_s": rate(len(items), timer.seconds)}


class _WorkerPool:
    """A process pool of `workers` (fork: the workers need nothing but this module), or None for 1."""

    def __init__(self, workers: int):
        self.executor = None if workers <= 1 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"))

    def __enter__(self) -> Optional[ProcessPoolExecutor]:
        return self.executor

    def __exit__(self, *exc: Any) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def add_parser(sub: Any) -> None:
    """Register the `make-shards` subcommand."""
    p = sub.add_parser("make-shards", help="images + captions (folder or manifest) -> webdataset shards",
                       description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="folder of images with sidecar .txt captions")
    src.add_argument("--manifest", help="CSV, JSONL or Parquet with image path and caption columns")
    p.add_argument("--out", required=True, help="output folder for 00000.tar, 00001.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose smaller side is below this (px)")
    p.add_argument("--reencode", choices=("keep", "jpg", "png"), default="keep",
                   help="keep JPEG/PNG/WebP bytes as they are (others become PNG), or re-encode all")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--image-column", default=None, help=f"manifest image column (default: first of {IMAGE_COLUMNS})")
    p.add_argument("--caption-column", default=None,
                   help=f"manifest caption column (default: first of {CAPTION_COLUMNS})")
    p.add_argument("--resize", type=int, default=0, metavar="SIZE",
                   help="scale each image's smaller side to SIZE px (bicubic, never up); 0: keep sizes")
    p.add_argument("--center-crop", action="store_true", help="with --resize: cut the centre SIZE x SIZE square")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode, resize and encode (the output does not depend on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: make_shards(
        a.out, a.input, a.manifest, a.shard_size, a.min_size, a.reencode, a.quality, a.image_column,
        a.caption_column, not a.no_progress, a.workers, a.resize, a.center_crop))
