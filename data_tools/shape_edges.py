"""How sharp and how smooth a shape's edge is, read from the pixels of a synthetic-shapes image.

The images of `data_tools.synthetic` are one flat shape on a flat background, so every pixel can
be placed on the line from the background colour to the shape's colour: t = 0 on the background,
1 on the shape (`edge_coordinate`). The shape's boundary is where t crosses 0.5. Two measures, both
in px at the image's own size:

- **edge width**: along the boundary's normal, the distance from where t passes 0.1 to where it
  passes 0.9 (the 10-90 % rise distance of an edge profile). A drawn image measures 0.8-1.1 px
  (one pixel step, read with linear interpolation); a Gaussian blur of sigma s makes it
  sqrt((2.56 s)^2 + 0.8^2); bicubic upsampling by 4 of a drawn image measures ~3 px. The image's
  value is the median over
  boundary points, so corners and the odd bad profile do not move it.
- **raggedness**: every shape of the dataset is convex, so its boundary should lie on its own
  convex hull; the RMS distance of the boundary points from the hull says how far the edge wanders
  in and out. The boundary is found on t smoothed over 1 px, so a drawn image's pixel staircase
  leaves ~0.1-0.3 px, whatever its size; bicubic upsampling by 4 turns the staircase of the smaller
  image into ~1 px.

`edge_measures` gives both per image; `compare_with_bicubic` is the check the quickstart applies
to each super-resolution stage.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from data_tools.synthetic import _dilate, shape_mask

# A stage passes the sharpness check when its median edge width is at most this fraction of the
# width that bicubic upsampling of its own input gives (at least 25 % narrower).
SHARPER_THAN_BICUBIC = 0.75
PROFILE_STEP_PX = 0.1


def edge_coordinate(image: np.ndarray, margin_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(t (h, w) float32, shape mask (h, w) bool) for a (H, W, 3) uint8 image.

    t is each pixel's position on the line from the background colour (median border colour, t=0)
    to the shape's colour (median of the shape's pixels eroded by 2 px, away from any blur, t=1).
    With `margin_px` > 0 both cover only the shape's bounding box grown by that many px (the
    measures need no more, and a 1024 px image costs a quarter as much).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    bg, mask = shape_mask(img)
    if margin_px > 0 and mask.any():
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        y0, y1 = max(0, ys[0] - margin_px), min(img.shape[0], ys[-1] + 1 + margin_px)
        x0, x1 = max(0, xs[0] - margin_px), min(img.shape[1], xs[-1] + 1 + margin_px)
        img, mask = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    pixels = img.astype(np.float32)
    core = ~_dilate(~mask, 2)  # the shape eroded by 2 px
    inner = pixels[core if core.any() else mask]
    fg = np.median(inner[::max(1, len(inner) // 20000)], axis=0) if mask.any() else bg  # a flat colour: a sample will do
    axis = (fg - bg).astype(np.float32)
    t = (pixels - bg.astype(np.float32)) @ axis / max(float(axis @ axis), 1e-9)
    return t, mask


def boundary_points(t: np.ndarray, mask: np.ndarray, side_px: int = 0) -> np.ndarray:
    """(P, 2) float (y, x) where t crosses 0.5 between two row- or column-neighbours, in a band of
    2 % of the image side (`side_px`, default t's height) around the shape mask's edge, so a speck
    far from the shape adds nothing."""
    band_px = max(2, round(0.02 * side_px)) if side_px else max(2, round(0.02 * t.shape[0]))
    band = _dilate(mask, band_px) & _dilate(~mask, band_px)  # within band_px of the mask's edge
    points = []
    for axis in (0, 1):
        a = t[:-1, :] if axis == 0 else t[:, :-1]
        b = t[1:, :] if axis == 0 else t[:, 1:]
        inside = (band[:-1, :] & band[1:, :]) if axis == 0 else (band[:, :-1] & band[:, 1:])
        cross = ((a - 0.5) * (b - 0.5) < 0) & inside
        ys, xs = np.nonzero(cross)
        frac = (0.5 - a[ys, xs]) / (b[ys, xs] - a[ys, xs])
        points.append(np.stack([ys + frac, xs], 1) if axis == 0 else np.stack([ys, xs + frac], 1))
    return np.concatenate(points).astype(np.float64)


def _rise_distance(profiles: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per profile (P, S) sampled at offsets s (S,) rising through 0.5 at s = 0: the distance from
    its last 0.1 crossing before 0 to its first 0.9 crossing after 0 (NaN if one is missing)."""
    centre = int(np.argmin(np.abs(s)))
    out = np.full(len(profiles), np.nan)
    for i, p in enumerate(profiles):
        below = np.nonzero(p[:centre + 1] <= 0.1)[0]
        above = np.nonzero(p[centre:] >= 0.9)[0]
        if not len(below) or not len(above):
            continue
        j, k = below[-1], centre + above[0]
        # Linear interpolation between the samples either side of each crossing.
        s10 = s[j] + (0.1 - p[j]) / (p[j + 1] - p[j]) * (s[j + 1] - s[j]) if p[j + 1] != p[j] else s[j]
        s90 = s[k - 1] + (0.9 - p[k - 1]) / (p[k] - p[k - 1]) * (s[k] - s[k - 1]) if p[k] != p[k - 1] else s[k]
        out[i] = s90 - s10
    return out


def edge_widths(t: np.ndarray, points: np.ndarray, max_points: int = 400, side_px: int = 0) -> np.ndarray:
    """10-90 % rise distance (px) of t along the boundary normal at (up to max_points of) `points`.

    The normal is the gradient of t smoothed over ~1/256 of the side (at least 1 px), so that
    neither grain nor the pixel staircase turns it; the profile is read from t itself, with
    bilinear interpolation, out to 4 % of the side (at least 4 px) each way. `side_px`: the
    image's side (default t's height).
    """
    if len(points) > max_points:
        points = points[np.linspace(0, len(points) - 1, max_points).round().astype(int)]
    side = side_px or t.shape[0]
    smooth = ndimage.gaussian_filter(t, max(1.0, side / 256))
    gy, gx = np.gradient(smooth)
    iy, ix = points[:, 0].round().astype(int), points[:, 1].round().astype(int)
    normal = np.stack([gy[iy, ix], gx[iy, ix]], 1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    reach = max(4.0, 0.04 * side)
    s = np.arange(-reach, reach + PROFILE_STEP_PX / 2, PROFILE_STEP_PX)
    coords = points[:, :, None] + normal[:, :, None] * s[None, None, :]  # (P, 2, S)
    profiles = ndimage.map_coordinates(t, [coords[:, 0].ravel(), coords[:, 1].ravel()], order=1,
                                       mode="nearest").reshape(len(points), len(s))
    return _rise_distance(profiles, s)


def raggedness(points: np.ndarray) -> float:
    """RMS distance (px) of boundary points from their convex hull's boundary (NaN if < 3 points)."""
    if len(points) < 3:
        return float("nan")
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line: no area
        return float("nan")
    # equations: n . p + c <= 0 inside; the distance to a convex boundary is to its nearest facet.
    inside = -(points @ hull.equations[:, :2].T + hull.equations[:, 2])  # (P, F), >= 0
    return float(np.sqrt(np.mean(inside.min(axis=1) ** 2)))


def edge_measures(image: np.ndarray) -> dict[str, Any]:
    """{"edge_width_px", "raggedness_px", "points"} of one (H, W, 3) uint8 image (NaN: no shape)."""
    side = np.asarray(image).shape[0]
    t, mask = edge_coordinate(image, margin_px=round(0.06 * side) + 4)  # past the profiles' reach
    if mask.sum() < 0.02 * side * side:
        return {"edge_width_px": float("nan"), "raggedness_px": float("nan"), "points": 0}
    points = boundary_points(ndimage.gaussian_filter(t, 1.0), mask, side)  # sub-pixel, off the staircase
    widths = edge_widths(t, points, side_px=side) if len(points) else np.array([np.nan])
    width = float(np.nanmedian(widths)) if np.isfinite(widths).any() else float("nan")
    return {"edge_width_px": round(width, 3), "raggedness_px": round(raggedness(points), 3),
            "points": int(len(points))}


def summarize(images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Median (and largest) edge width and raggedness over images (N, H, W, 3) uint8."""
    per_image = [edge_measures(image) for image in images]
    out: dict[str, Any] = {"images": len(per_image)}
    for key in ("edge_width_px", "raggedness_px"):
        values = np.array([m[key] for m in per_image], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = round(float(np.median(finite)), 3) if len(finite) else float("nan")
        out[key.replace("_px", "_max_px")] = round(float(finite.max()), 3) if len(finite) else float("nan")
    out["per_image"] = per_image
    return out


def compare_with_bicubic(stage: dict[str, Any], bicubic: dict[str, Any],
                         margin: float = SHARPER_THAN_BICUBIC) -> dict[str, Any]:
    """The sharpness check of one SR stage: its median edge width (a `summarize` result) against
    that of bicubic upsampling of the same inputs; it passes when stage <= margin x bicubic."""
    ratio = stage["edge_width_px"] / bicubic["edge_width_px"]
    return {"edge_width_ratio": round(float(ratio), 3), "margin": margin,
            "sharper_than_bicubic": bool(np.isfinite(ratio) and ratio <= margin)}


__all__ = ["edge_coordinate", "boundary_points", "edge_widths", "raggedness", "edge_measures", "summarize",
           "compare_with_bicubic", "SHARPER_THAN_BICUBIC"]
