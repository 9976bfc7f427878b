"""Edge width and raggedness (data_tools/shape_edges.py) on drawn images whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from data_tools.shape_edges import SHARPER_THAN_BICUBIC, compare_with_bicubic, edge_measures, summarize
from data_tools.synthetic import draw_sample

# Sample indices of seed 0 (large shapes) covering the three kinds at every size.
INDICES = (0, 1, 5, 6)


def drawn(index: int, size: int) -> Image.Image:
    image, _, meta = draw_sample(0, index, size, ("large",))
    return image


def test_the_indices_cover_every_kind():
    kinds = {draw_sample(0, i, 64, ("large",))[2]["shape"] for i in INDICES}
    assert kinds == {"circle", "square", "triangle"}


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_a_drawn_edge_is_one_pixel_step_and_lies_on_its_hull(size):
    """A drawn shape: a one-pixel step read with linear interpolation (0.8 px across an axis-aligned
    edge, up to ~1.1 px across a sloped one) and a boundary on its hull (up to the staircase)."""
    for index in INDICES:
        m = edge_measures(np.asarray(drawn(index, size)))
        assert 0.75 <= m["edge_width_px"] <= 1.15, (index, m)
        assert m["raggedness_px"] < 0.35, (index, m)


def test_gaussian_blur_widens_the_edge_by_2_56_sigma():
    """A Gaussian of sigma s turns a step into a rise of 2 x 1.2816 s from 10 % to 90 % (plus the
    pixel step, in quadrature); the boundary stays smooth."""
    for sigma in (2.0, 4.0):
        expected = math.hypot(2.563 * sigma, 0.8)
        for index in INDICES:
            m = edge_measures(np.asarray(drawn(index, 256).filter(ImageFilter.GaussianBlur(sigma))))
            assert abs(m["edge_width_px"] - expected) < 0.12 * expected, (sigma, index, m)
            assert m["raggedness_px"] < 0.35


def test_bicubic_upsampling_blurs_by_about_its_factor_and_the_check_tells_sharp_from_blurred():
    """Bicubic x4 of a drawn 256 px image measures ~3 px at 1024; the drawn 1024 px image passes
    the sharpness check against it, a blurred one fails it, and so does bicubic against itself."""
    sharp, blurred, plain = [], [], []
    for index in INDICES[:3]:
        image = drawn(index, 1024)
        small = drawn(index, 256)
        sharp.append(np.asarray(image))
        blurred.append(np.asarray(image.filter(ImageFilter.GaussianBlur(2.0))))
        plain.append(np.asarray(small.resize((1024, 1024), Image.BICUBIC)))
    baseline = summarize(plain)
    assert 2.5 <= baseline["edge_width_px"] <= 3.5 and baseline["raggedness_px"] > 0.6, baseline
    ok = compare_with_bicubic(summarize(sharp), baseline)
    assert ok["sharper_than_bicubic"] and ok["edge_width_ratio"] < 0.3 and ok["margin"] == SHARPER_THAN_BICUBIC
    bad = compare_with_bicubic(summarize(blurred), baseline)
    assert not bad["sharper_than_bicubic"] and bad["edge_width_ratio"] > 1.0, bad
    assert not compare_with_bicubic(baseline, baseline)["sharper_than_bicubic"]


def _jagged_circle(size: int, amplitude_px: float, seed: int = 0) -> np.ndarray:
    """A red disc of radius size/4 on a dark background whose radius wanders by +-amplitude_px,
    uniformly, from one vertex to the next (~4.5 px apart at 256 px)."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    radius = size / 4 + rng.uniform(-amplitude_px, amplitude_px, len(angles))
    c = size / 2
    image = Image.new("RGB", (size, size), (35, 35, 35))
    ImageDraw.Draw(image).polygon([(c + r * np.cos(a), c + r * np.sin(a)) for a, r in zip(angles, radius)],
                                  fill=(220, 20, 20))
    return np.asarray(image)


def test_raggedness_grows_with_a_wandering_boundary():
    smooth = edge_measures(_jagged_circle(256, 0.0))["raggedness_px"]
    ragged = edge_measures(_jagged_circle(256, 3.0))["raggedness_px"]
    assert smooth < 0.35 and ragged > 1.0, (smooth, ragged)


def test_grain_on_the_background_barely_moves_the_edge_and_no_shape_gives_nan():
    rng = np.random.default_rng(0)
    pixels = np.asarray(drawn(1, 256)).astype(float)
    noisy = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).round().astype(np.uint8)
    assert 0.7 <= edge_measures(noisy)["edge_width_px"] <= 1.4
    flat = np.full((64, 64, 3), 35, np.uint8)
    m = edge_measures(flat)
    assert math.isnan(m["edge_width_px"]) and m["points"] == 0
    with pytest.raises(ValueError, match="expected an"):
        edge_measures(flat[..., 0])
