"""Image decoding, the per-stage image pyramid, and text padding (data/samples.py puts them together).

Only the schema's keys are ever decoded (images with PIL, text as UTF-8, JSON, `.npy` with
`allow_pickle=False`); anything else in a tar is ignored. Images follow the reference recipe:
resize the smallest side to the stage's output resolution (bicubic, which PIL anti-aliases when
it shrinks), crop a square (center, or random when asked), scale to [-1, 1]. SR stages get the
low-res conditioning image by anti-aliased bicubic downsampling of the very same crop. When the
network trains on smaller patches than the stage outputs (sr1024 trains on 256 px crops of the
1024 px image), a random patch is cut and its low-res is that region downsampled 4x, as in the
paper.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageFilter

Image.MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs above ~268 MP


class SkipSample(Exception):
    """A sample that must be skipped; `reason` is the counter it is filed under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class StageGeometry:
    """Sizes one stage reads: output square, training patch, low-res patch, minimum input side."""

    output_resolution: int     # the square the whole image is cropped to (64, 256, 1024)
    train_resolution: int      # the patch the network sees (sr1024: 256)
    lowres_resolution: Optional[int]  # the low-res patch (None for the base stage)
    min_image_size: int        # images whose smaller side is below this are skipped
    random_crop: bool = False  # random instead of center crop of the output square
    lowres_blur_max_px: float = 0.0  # low-res blurred by a Gaussian of sigma uniform in [0, this]

    @classmethod
    def from_config(cls, cfg: Any) -> "StageGeometry":
        """Geometry of `cfg.stage` with `cfg.train_resolution` and `cfg.data.min_image_size`."""
        out = cfg.output_resolution
        return cls(out, cfg.train_resolution, cfg.lowres_resolution,
                   cfg.data.min_image_size or out, cfg.data.random_crop, cfg.data.lowres_blur_max_px)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8, contiguous (scaled to [-1, 1] per batch by `to_unit_range`)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 in [-1, 1]; one pass over a contiguous batch is far cheaper."""
    return images.float().mul_(1 / 127.5).sub_(1.0)


def decode_image(data: bytes, min_size: int, target_short_side: int) -> Image.Image:
    """Decode to RGB, refusing images whose smaller side is below `min_size` before full decode."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Exception as err:  # noqa: BLE001 - any PIL failure means an unusable image
        raise SkipSample("bad_image", str(err)) from None
    if min(w, h) < min_size:
        raise SkipSample("too_small", f"{w}x{h} < {min_size}")
    scale = target_short_side / min(w, h)
    if scale < 0.5 and img.format == "JPEG":
        img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))  # DCT-domain shrink
    try:
        return img.convert("RGB")
    except Exception as err:  # noqa: BLE001
        raise SkipSample("bad_image", str(err)) from None


def image_pyramid(img: Image.Image, geo: StageGeometry, rng: random.Random
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(image (3, T, T), lowres (3, t, t) or None) uint8, for one decoded RGB image."""
    out = geo.output_resolution
    w, h = img.size
    scale = out / min(w, h)
    if (w, h) != (out, out):
        nw, nh = max(out, round(w * scale)), max(out, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        w, h = img.size
    if geo.random_crop:
        left, top = rng.randint(0, w - out), rng.randint(0, h - out)
    else:
        left, top = (w - out) // 2, (h - out) // 2
    img = img.crop((left, top, left + out, top + out))
    patch = geo.train_resolution
    if patch < out:
        # Patch offsets on the low-res grid, so the low-res patch is a whole-pixel region of the
        # full low-res image (paper: 256 crops of 1024 with the matching 64 crop of the 256 image).
        step = max(1, patch // geo.lowres_resolution) if geo.lowres_resolution else 1
        x = rng.randrange(0, out - patch + 1, step)
        y = rng.randrange(0, out - patch + 1, step)
        img = img.crop((x, y, x + patch, y + patch))
    lowres = None
    if geo.lowres_resolution:
        small = img.resize((geo.lowres_resolution,) * 2, Image.BICUBIC, reducing_gap=None)
        if geo.lowres_blur_max_px > 0:  # draws from rng only then: unblurred runs read as before
            small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0, geo.lowres_blur_max_px)))
        lowres = _to_tensor(small)
    return _to_tensor(img), lowres


# Padded lengths are rounded up to this: few distinct shapes (torch.compile, allocator reuse) and
# key lengths the GPU attention kernels take without re-padding.
PAD_MULTIPLE = 8


def pad_embeddings(embs: list[np.ndarray], max_length: int, to_longest: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """B arrays (n_i, D) float16 -> (text_emb (B, L, D) float16 zero-padded, text_mask (B, L) bool).

    L is the batch's longest caption rounded up to PAD_MULTIPLE (at most `max_length`), or
    `max_length` if not `to_longest`. Padding is masked everywhere the networks read text, so a
    shorter L changes no output and saves the attention, the text projections and the copy to the
    device their work on padding. float16 is how the shards store embeddings; the network casts
    them to its dtype on the device (float16 -> float32 or bfloat16 is exact or the same rounding
    as through float32), so the host copy is half the bytes.
    """
    lengths = [min(emb.shape[0], max_length) for emb in embs]
    length = max_length
    if to_longest:
        length = min(max_length, -(-max(lengths, default=1) // PAD_MULTIPLE) * PAD_MULTIPLE)
    out = torch.zeros(len(embs), length, embs[0].shape[1], dtype=torch.float16)
    mask = torch.zeros(len(embs), length, dtype=torch.bool)
    for i, (emb, n) in enumerate(zip(embs, lengths)):
        out[i, :n] = torch.from_numpy(np.asarray(emb[:n], dtype=np.float16))
        mask[i, :n] = True
    return out, mask
