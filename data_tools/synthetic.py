"""`synthetic`: a captioned dataset of one coloured shape per image, drawn in code.

Built to be learned fast by a tiny model on a CPU: one large, clean, saturated shape on a plain
background; few factors, each named in the caption ("a small red circle at the top left on a
dark background"). Sample i depends only on (seed, i), so any subset or shard size gives the
same images; the json entry records what was drawn (shape, colour name and RGB, centre, radius).
`--layout folder` or `--layout coco` writes loose image files instead (a folder with .txt
captions, or COCO's layout), to rehearse the paths that start from files (docs/guide.md).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from data_tools.common import ShardWriter, Timer, progress, rate

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 20, 20), "green": (20, 170, 40), "blue": (30, 70, 230), "yellow": (245, 210, 0)}
SIZES = {"small": 0.14, "large": 0.24}  # half-extent as a fraction of the side
POSITIONS = {"in the center": (0.5, 0.5), "at the top left": (0.27, 0.27),
             "at the top right": (0.73, 0.27), "at the bottom left": (0.27, 0.73),
             "at the bottom right": (0.73, 0.73)}
BACKGROUNDS = {"light": (225, 225, 225), "dark": (35, 35, 35)}
CAPTION_ATTRIBUTES = ("colour", "shape", "position", "background")  # what drop_attributes may leave out


def check_sizes(sizes: tuple[str, ...]) -> None:
    """Raise ValueError unless `sizes` is a non-empty subset of the SIZES names."""
    if not sizes or set(sizes) - set(SIZES):
        raise ValueError(f"sizes must be a non-empty subset of {sorted(SIZES)}, got {list(sizes)}")


def draw_sample(seed: int, index: int, resolution: int, sizes: tuple[str, ...] = tuple(SIZES),
                drop_attributes: float = 0.0) -> tuple[Image.Image, str, dict[str, Any]]:
    """(RGB image, caption, metadata) of sample `index`; a pure function of its arguments.

    `sizes` narrows the size names drawn from (the CPU quickstart draws only large shapes).
    `drop_attributes` is the probability that the caption leaves out each of colour, kind,
    position and background, independently ("a large red shape at the top left", "a large
    square"); the image is the same either way, and `meta["full_caption"]` names everything.
    """
    check_sizes(sizes)
    rng = random.Random(int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1)[0]))
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    size = rng.choice(sorted(sizes))
    position = rng.choice(sorted(POSITIONS))
    background = rng.choice(sorted(BACKGROUNDS))
    r = SIZES[size] * resolution
    fx, fy = POSITIONS[position]
    cx, cy = fx * resolution, fy * resolution
    img = Image.new("RGB", (resolution, resolution), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:  # apex up; the centre (cx, cy) lies inside
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    words = {"colour": colour, "shape": shape, "position": position, "background": f"on a {background} background"}
    named = [k for k in CAPTION_ATTRIBUTES if not (drop_attributes and rng.random() < drop_attributes)]
    full_caption = " ".join(["a", size, *words.values()])
    # A left-out kind still needs a noun: "a large red shape at the top left".
    caption = " ".join(["a", size, *(words[k] if k in named else "shape" for k in CAPTION_ATTRIBUTES
                                      if k in named or k == "shape")])
    meta = {"shape": shape, "colour": colour, "rgb": list(rgb), "size": size, "position": position,
            "background": background, "center": [round(cx, 2), round(cy, 2)], "radius": round(r, 2),
            "full_caption": full_caption, "named": named}
    return img, caption, meta


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption (or prompt) names: shape, colour, position, background, size.

    Raises ValueError naming the caption if it lacks a colour, shape or position of this dataset.
    """
    found = {"shape": [s for s in SHAPES if f" {s} " in f" {caption} "],
             "colour": [c for c in COLOURS if f" {c} " in f" {caption} "],
             "position": [p for p in POSITIONS if p in caption],
             "background": [b for b in BACKGROUNDS if f"{b} background" in caption],
             "size": [z for z in SIZES if f" {z} " in f" {caption} "]}
    missing = [k for k in ("shape", "colour", "position") if len(found[k]) != 1]
    if missing:
        raise ValueError(f"caption {caption!r} names no single {', '.join(missing)} of the synthetic dataset")
    return {k: v[0] for k, v in found.items() if len(v) == 1}


def _clean(mask: np.ndarray) -> np.ndarray:
    """Majority vote over each pixel's 3x3 neighbourhood: drops speckles, keeps shapes."""
    padded = np.pad(mask.astype(np.int32), 1)
    votes = sum(padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3))
    return votes >= 5


def shape_mask(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background RGB (3,) float, shape mask (H, W) bool) of a (H, W, 3) uint8 image.

    The background is the median border colour; the shape is every pixel whose RGB distance from
    it is over 100, speckles voted out (`_clean`). Shared by `read_shape`, `background_std` and
    the edge measures (`data_tools.shape_edges`), so they all see the same shape.
    """
    pixels = np.asarray(image).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg = np.median(border, axis=0)
    return bg, _clean(np.linalg.norm(pixels - bg, axis=2) > 100.0)


def read_shape(image: np.ndarray) -> dict[str, Any]:
    """What a (H, W, 3) uint8 image of this dataset shows, read back from its pixels.

    The inverse of `draw_sample`, for judging generated images. The background is the median
    border colour; the foreground is every pixel far from it (RGB distance > 100), speckles voted
    out; its colour is the named colour nearest the foreground's median. Its kind: a triangle
    (apex up) when the top half of its bounding box holds under 0.6x the foreground of the bottom
    half (a triangle 1/3, a square or circle 1), else a square when it fills over 0.89 of the box
    (a square 1, a circle pi/4), else a circle. Its position is the named position nearest the
    centre of the bounding box. `shape`, `colour` and `position` are None when under 2 % of the
    image is foreground.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    h, w, _ = img.shape
    pixels = img.astype(np.float32)
    bg, mask = shape_mask(img)
    background = min(BACKGROUNDS, key=lambda b: np.linalg.norm(np.array(BACKGROUNDS[b]) - bg))
    result: dict[str, Any] = {"background": background, "area": round(float(mask.mean()), 4),
                              "shape": None, "colour": None, "position": None}
    if mask.mean() < 0.02:
        return result
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    half = (y1 - y0) // 2
    top, bottom = box[:half].sum(), box[-half:].sum()
    fill = float(box.mean())
    if top < 0.6 * bottom:
        shape = "triangle"
    else:
        shape = "square" if fill > 0.89 else "circle"
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    fg = np.median(pixels[mask], axis=0)
    result.update(
        colour=min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - fg)),
        shape=shape,
        position=min(POSITIONS, key=lambda p: np.hypot(POSITIONS[p][0] - cx, POSITIONS[p][1] - cy)),
        fill=round(fill, 3), center=[round(float(cx), 3), round(float(cy), 3)])
    return result


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean mask by `radius` pixels (a square neighbourhood), one axis at a time."""
    for axis in (0, 1):
        padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        n = mask.shape[axis]
        mask = np.logical_or.reduce([np.take(padded, range(k, k + n), axis=axis) for k in range(2 * radius + 1)])
    return mask


def background_std(image: np.ndarray) -> float:
    """Grain on the flat background of a (H, W, 3) uint8 image, in 0-255 units.

    The shape is what `read_shape` takes for it (pixels over 100 away from the median border
    colour, speckles voted out), grown by 6 % of the side so that a blurred edge stays out; the
    result is the largest over R, G, B of the standard deviation of the other pixels: 0 for a
    drawn image, about s for one carrying per-pixel noise of std s. NaN when nothing is left.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    pixels = img.astype(np.float64)
    shape = _dilate(shape_mask(img)[1], max(1, round(0.06 * img.shape[0])))
    if shape.all():
        return float("nan")
    return round(float(pixels[~shape].std(axis=0).max()), 3)


def prompt_following(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Fractions of images (N, H, W, 3) uint8 whose read colour, shape, position, background, and
    all of colour + shape + position, match their prompt's (`prompts[i]` for image i)."""
    if len(images) != len(prompts) or not len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    keys = ("colour", "shape", "position", "background")
    hits = {k: 0 for k in (*keys, "all")}
    for image, prompt in zip(images, prompts):
        want, got = parse_caption(prompt), read_shape(image)
        ok = {k: got[k] == want.get(k) for k in keys}
        for k in keys:
            hits[k] += ok[k]
        hits["all"] += ok["colour"] and ok["shape"] and ok["position"]
    return {k: round(v / len(prompts), 3) for k, v in hits.items()}


def palette_image(img: Image.Image) -> Image.Image:
    """The same pixels as a palette ("P") image when `img` holds at most 256 colours, else `img`.

    A drawn sample holds two colours, so its PNG stores one byte a pixel instead of three and
    decodes ~10x faster (1024 px: ~7 ms against ~75 ms on the development VM), losslessly.
    """
    colours = img.getcolors(maxcolors=256)
    if colours is None:
        return img
    rgb = np.asarray(img, dtype=np.uint32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one int per colour
    index = np.zeros(code.shape, np.uint8)
    for k, (_, (r, g, b)) in enumerate(colours):
        index[code == ((r << 16) | (g << 8) | b)] = k
    out = Image.fromarray(index, "P")
    out.putpalette([c for _, colour in colours for c in colour])
    return out


def _encode(img: Image.Image, image_format: str, palette: bool = False) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        (palette_image(img) if palette else img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_synthetic(out: str | Path, num_samples: int, resolution: int = 64, shard_size: int = 1000,
                    seed: int = 0, holdout: float = 0.0, holdout_out: Optional[str | Path] = None,
                    image_format: str = "png", progress_bar: bool = True,
                    exclude: tuple[str, ...] = (), sizes: tuple[str, ...] = tuple(SIZES),
                    drop_attributes: float = 0.0, palette: bool = False) -> dict[str, Any]:
    """Draw `num_samples` samples into shards under `out` (the last `holdout` fraction apart).

    Training samples whose full caption (every attribute named) contains any phrase of `exclude`
    are passed over (the next index is drawn instead), so prompts with those combinations are
    new to a model trained on the shards; the holdout keeps every combination. Training captions
    leave out attributes with probability `drop_attributes` each (`draw_sample`); holdout
    captions name them all. `palette` stores PNGs as palette images (`palette_image`: the same
    pixels, a ~10x cheaper decode for the loader).
    """
    if not 64 <= resolution <= 1024:
        raise ValueError(f"resolution must be in 64..1024, got {resolution}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image format must be png or jpg, got {image_format}")
    check_sizes(sizes)
    if not 0.0 <= drop_attributes < 1.0:
        raise ValueError(f"drop_attributes must be a probability in [0, 1), got {drop_attributes}")
    out = Path(out)
    num_holdout = int(round(num_samples * holdout))
    holdout_dir = Path(holdout_out) if holdout_out else out / "holdout"
    timer = Timer()
    train, held = ShardWriter(out, shard_size), (ShardWriter(holdout_dir, shard_size) if num_holdout else None)
    written, skipped, i = 0, 0, 0
    with progress(num_samples, "synthetic", progress_bar) as bar:
        while written < num_samples:
            in_holdout = held is not None and written >= num_samples - num_holdout
            img, caption, meta = draw_sample(seed, i, resolution, sizes, 0.0 if in_holdout else drop_attributes)
            key = f"{i:09d}"
            i += 1
            if not in_holdout and any(phrase in meta["full_caption"] for phrase in exclude):
                skipped += 1
                continue
            meta = {"key": key, "caption": caption, "width": resolution, "height": resolution, **meta}
            entries = {image_format: _encode(img, image_format, palette), "txt": caption.encode(),
                       "json": json.dumps(meta).encode()}
            (held if in_holdout else train).write(key, entries)
            written += 1
            bar.update()
    train.flush()
    if held is not None:
        held.flush()
    return {"command": "synthetic", "out": str(out), "num_samples": num_samples - num_holdout,
            "shards": len(train.shards), "holdout_out": str(holdout_dir) if held else None,
            "holdout_samples": num_holdout, "holdout_shards": len(held.shards) if held else 0,
            "resolution": resolution, "seed": seed, "format": image_format,
            "excluded_phrases": list(exclude), "sizes": sorted(sizes), "skipped_for_exclude": skipped,
            "drop_attributes": drop_attributes, "palette": palette,
            "seconds": round(timer.seconds, 2), "samples_per_s": rate(num_samples, timer.seconds)}


def write_synthetic_files(out: str | Path, num_samples: int, resolution: int = 256, seed: int = 0,
                          layout: str = "folder", image_format: str = "png") -> dict[str, Any]:
    """Draw samples as loose files, for rehearsing the paths that start from files:

    - "folder": OUT/NNNNNNNNN.png with its caption in OUT/NNNNNNNNN.txt (`make-shards --input`);
    - "coco": OUT/val2014/COCO_val2014_NNNNNNNNNNNN.png and OUT/annotations/captions_val2014.json
      with one caption per image, in COCO's layout (`coco --annotations ... --images ...`).
    """
    if layout not in ("folder", "coco"):
        raise ValueError(f"layout must be folder or coco, got {layout}")
    out = Path(out)
    timer = Timer()
    folder = out / "val2014" if layout == "coco" else out
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_samples):
        img, caption, _ = draw_sample(seed, i, resolution)
        name = f"COCO_val2014_{i + 1:012d}.{image_format}" if layout == "coco" else f"{i:09d}.{image_format}"
        (folder / name).write_bytes(_encode(img, image_format))
        if layout == "folder":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
        images.append({"id": i + 1, "file_name": name, "width": resolution, "height": resolution})
        annotations.append({"id": 1000 + i, "image_id": i + 1, "caption": caption})
    if layout == "coco":
        (out / "annotations").mkdir(exist_ok=True)
        (out / "annotations" / "captions_val2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    return {"command": "synthetic", "out": str(out), "layout": layout, "num_samples": num_samples,
            "resolution": resolution, "seed": seed, "format": image_format, "seconds": round(timer.seconds, 2)}


def _run(a: Any) -> dict[str, Any]:
    if a.layout != "shards":
        return write_synthetic_files(a.out, a.num_samples, a.resolution, a.seed, a.layout, a.image_format)
    return write_synthetic(a.out, a.num_samples, a.resolution, a.shard_size, a.seed, a.holdout, a.holdout_out,
                           a.image_format, not a.no_progress, tuple(a.exclude),
                           tuple(x for x in a.sizes.split(",") if x), a.drop_attributes, a.palette)


def add_parser(sub: Any) -> None:
    """Register the `synthetic` subcommand."""
    p = sub.add_parser("synthetic", help="draw a captioned coloured-shapes dataset (deterministic by seed)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="output folder for the training shards")
    p.add_argument("--num-samples", type=int, default=10_000, help="samples in total, holdout included")
    p.add_argument("--resolution", type=int, default=64, help="image side in px, 64..1024")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of this")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction written to the holdout folder")
    p.add_argument("--holdout-out", default=None, help="holdout folder (default: OUT/holdout)")
    p.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png",
                   help="image encoding")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--exclude", action="append", default=[], metavar="PHRASE",
                   help="leave training samples whose caption contains PHRASE out (repeatable), "
                        "e.g. 'red square', so such prompts are new at sampling")
    p.add_argument("--sizes", default=",".join(SIZES),
                   help=f"comma-separated shape sizes to draw, a subset of {','.join(SIZES)}")
    p.add_argument("--drop-attributes", type=float, default=0.0, metavar="P",
                   help="probability that a training caption leaves out each of colour, kind ('shape'), "
                        "position and background, independently (holdout captions name all)")
    p.add_argument("--palette", action="store_true",
                   help="store PNGs as palette images: the same pixels, a ~10x cheaper decode")
    p.add_argument("--layout", choices=("shards", "folder", "coco"), default="shards",
                   help="shards; or loose files: a folder of images with .txt captions, or COCO's "
                        "val2014/ + annotations/captions_val2014.json (for rehearsing those inputs)")
    p.set_defaults(func=_run)
