"""`coco`: the FID-30K evaluation set from COCO's caption annotations.

Reads a COCO captions file (`annotations/captions_val2014.json`: `images` with `id` and
`file_name`, `annotations` with `image_id` and `caption`) and the folder of its images, draws
`--num` images at random (seeded), one caption of each (also drawn), and writes:

    OUT/captions.txt       one caption a line: `evaluation.captions_file` of launch/evaluate.py
    OUT/reference.jsonl    {"image": path, "caption": ...} per drawn image, the same order:
                           `make-shards --manifest` turns it into shards, `fid-stats` into the
                           reference statistics

The Imagen paper's zero-shot COCO FID-30K draws 30,000 captions of the 2014 validation set and
compares 256 x 256 samples with the validation images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data_tools.common import Timer, atomic_write_bytes


def coco_pairs(annotations: str | Path, images: str | Path, num: int, seed: int = 0) -> list[tuple[str, str]]:
    """(image path, caption) for `num` images drawn without replacement (all when num is 0 or
    more than there are), one of each image's captions drawn too; in drawing order."""
    data = json.loads(Path(annotations).read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        text = " ".join(str(ann["caption"]).split())  # one line: COCO captions hold stray newlines
        if text and ann["image_id"] in files:
            captions.setdefault(ann["image_id"], []).append(text)
    ids = sorted(captions)
    rng = random.Random(seed)
    chosen = rng.sample(ids, num) if 0 < num < len(ids) else ids
    return [(str(Path(images) / files[i]), rng.choice(captions[i])) for i in chosen]


def write_coco(annotations: str | Path, images: str | Path, out: str | Path, num: int = 30_000,
               seed: int = 0) -> dict[str, Any]:
    """Write OUT/captions.txt and OUT/reference.jsonl; returns the summary."""
    timer = Timer()
    pairs = coco_pairs(annotations, images, num, seed)
    missing = [path for path, _ in pairs if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"coco: {len(missing)} of {len(pairs)} drawn images are not in {images}, e.g. "
                         f"{missing[0]} (is --images the folder of {Path(annotations).name}?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "captions.txt", "".join(c + "\n" for _, c in pairs).encode())
    atomic_write_bytes(out / "reference.jsonl",
                       "".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in pairs).encode())
    return {"command": "coco", "out": str(out), "pairs": len(pairs), "seed": seed,
            "captions_file": str(out / "captions.txt"), "manifest": str(out / "reference.jsonl"),
            "seconds": round(timer.seconds, 2)}


def add_parser(sub: Any) -> None:
    """Register the `coco` subcommand."""
    p = sub.add_parser("coco", help="COCO captions + images -> evaluation captions and a reference manifest",
                       description=__doc__)
    p.add_argument("--annotations", required=True, help="COCO captions JSON, e.g. annotations/captions_val2014.json")
    p.add_argument("--images", required=True, help="the folder of its images, e.g. val2014/")
    p.add_argument("--out", required=True, help="output folder for captions.txt and reference.jsonl")
    p.add_argument("--num", type=int, default=30_000, help="images (one caption each) to draw; 0: all")
    p.add_argument("--seed", type=int, default=0, help="the draw is a pure function of this")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; it shows no bar")
    p.set_defaults(func=lambda a: write_coco(a.annotations, a.images, a.out, a.num, a.seed))
