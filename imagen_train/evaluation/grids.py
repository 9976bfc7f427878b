"""Saving samples: one PNG per image and image grids (PIL only, no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .fid import to_uint8


def to_pil(image: Tensor) -> Image.Image:
    """One image (3, H, W), float in [-1, 1] or uint8, -> PIL RGB."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def make_grid(images: Tensor, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """A grid of images (N, 3, H, W) with `pad` px of white between them; ncols ~ sqrt(N)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, _, h, w = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(canvas)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


__all__ = ["to_pil", "make_grid", "save_png"]
