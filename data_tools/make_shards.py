"""`make-shards`: images + captions -> webdataset shards with img2dataset-compatible keys.

Inputs: a folder of images with sidecar captions (`photo.jpg` + `photo.txt`, searched
recursively, sorted), or a manifest of (image path, caption) rows as CSV, JSONL or Parquet
(Parquet needs pyarrow). Relative image paths in a manifest are relative to the manifest.
Each sample gets `jpg`/`png`/`webp` (the original bytes, or re-encoded), `txt` and `json`
(key, caption, width, height, original_path), in shards `00000.tar`, `00001.tar`, ...
"""

from __future__ import annotations

import csv
import io
import json
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


def _convert(data: bytes, reencode: str, quality: int) -> tuple[str, bytes, int, int]:
    """(ext, bytes, width, height); raises on an undecodable image."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()  # full decode: a truncated or corrupt file fails here
    w, h = img.size
    if reencode == "keep" and fmt in KEEP_FORMATS:
        return KEEP_FORMATS[fmt], data, w, h
    target = "jpg" if reencode == "jpg" else "png"
    buf = io.BytesIO()
    rgb = img.convert("RGB") if target == "jpg" or img.mode not in ("RGB", "RGBA", "L") else img
    rgb.save(buf, format="JPEG" if target == "jpg" else "PNG", **({"quality": quality} if target == "jpg" else {}))
    return target, buf.getvalue(), w, h


def make_shards(out: str | Path, input_dir: Optional[str | Path] = None, manifest: Optional[str | Path] = None,
                shard_size: int = 1000, min_size: int = 0, reencode: str = "keep", quality: int = 95,
                image_column: Optional[str] = None, caption_column: Optional[str] = None,
                progress_bar: bool = True) -> dict[str, Any]:
    """Write shards from a folder or manifest; returns the summary dict."""
    if (input_dir is None) == (manifest is None):
        raise ValueError("give exactly one of an input folder or a manifest")
    if reencode not in ("keep", "jpg", "png"):
        raise ValueError(f"reencode must be keep, jpg or png, got {reencode}")
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

    writer = ShardWriter(out, shard_size)
    with progress(len(items), "make-shards", progress_bar) as bar:
        for path, caption in items:
            bar.update()
            if caption is None:
                skip("no_caption", path)
                continue
            try:
                data = Path(path).read_bytes()
                ext, data, w, h = _convert(data, reencode, quality)
            except Exception:  # noqa: BLE001 - unreadable file or undecodable image
                skip("bad_image", path)
                continue
            if min(w, h) < min_size:
                skip("too_small", path)
                continue
            key = f"{writer.num_samples:09d}"
            meta = {"key": key, "status": "success", "caption": caption, "width": w, "height": h,
                    "original_path": path}
            writer.write(key, {ext: data, "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode()})
    writer.flush()
    return {"command": "make-shards", "out": str(out), "inputs": len(items), "samples": writer.num_samples,
            "shards": len(writer.shards), "skipped": counts, "skipped_samples": skipped,
            "seconds": round(timer.seconds, 2), "samples_per_s": rate(len(items), timer.seconds)}


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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: make_shards(
        a.out, a.input, a.manifest, a.shard_size, a.min_size, a.reencode, a.quality, a.image_column,
        a.caption_column, not a.no_progress))
