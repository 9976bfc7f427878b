"""Our FID and CLIP score equal the published references on the same inputs.

FID: torch-fidelity's `FeatureExtractorInceptionV3` (and torchmetrics' FrechetInceptionDistance
with antialias=False, which runs it) was recorded on seeded random Inception weights and a few
fixed non-square images by tests/golden/make_fidelity_reference.py, in a separate venv (it needs
torchvision, which would replace this project's torch). Here our pipeline recomputes them. The
weights and images are drawn with NumPy only (tests/fidelity_inputs.py) and their sha256 must
match the recorded one, so a change in how they are drawn fails instead of comparing different
inputs. Tolerances (measured with torch 2.13 CPU here against torch 2.14.1 in the reference venv):
- FEATURE_ATOL 3e-5: measured 6.7e-6 on features up to 22 (float32 convolutions round differently
  across torch builds and thread counts). pytorch-fid's full pipeline is 0.11 away on the same
  weights (its FID 1.0% off), so the tolerance tells the pipelines apart by three orders of magnitude.
- EXACT_FID_RTOL 3e-6: measured 8.3e-7, our FID against the exact FID of torch-fidelity's features.
- PACKAGE_FID_RTOL 1e-4: measured 1.1e-5 (torch-fidelity) and 1.9e-5 (torchmetrics). With 3
  images a set both covariances are singular, and the packages' 2048 x 2048 eigenvalue formulas
  carry round-off from ~2000 zero eigenvalues (our low-rank formula is exact, see fid.py).
- FORMULA_RTOL 1e-9: on well-conditioned statistics the three packages' formulas agree with each
  other to 6e-13, and ours is within 8e-12 of each.

CLIP: our preprocessing against transformers' CLIP image processor (the PIL/NumPy one,
`CLIPImageProcessorPil`; the default class needs torchvision), on square and non-square images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from imagen_train.evaluation.fid import FeatureStats, fid_from_features, frechet_distance
from imagen_train.evaluation.inception import FIDInceptionV3

from fidelity_inputs import (draw_images, formula_features, inception_state_dict, sha256_images,
                             sha256_state_dict)

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN = GOLDEN_DIR / "fidelity-reference.npz"
SCRIPT = GOLDEN_DIR / "make_fidelity_reference.py"
FEATURE_ATOL = 3e-5
EXACT_FID_RTOL = 3e-6
PACKAGE_FID_RTOL = 1e-4
FORMULA_RTOL = 1e-9
HOW_TO_RUN_LIVE = (f"torch_fidelity is not importable: it needs torchvision, which would replace this "
                   f"project's torch. To run this check live, build the reference venv described at the top "
                   f"of {SCRIPT.relative_to(GOLDEN_DIR.parent.parent)} (torch==2.14.1, torchvision==0.29.1, "
                   f"torch-fidelity, torchmetrics, pytorch-fid, pytest) and run this file with it and "
                   f"PYTHONPATH=<repo>; the recorded check above runs everywhere")


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def inputs() -> tuple[dict, dict]:
    return inception_state_dict(), draw_images()


@pytest.fixture(scope="module")
def ours(inputs) -> dict[str, np.ndarray]:
    """Our pool3 features of the fixed images, with the fixed random weights."""
    state, sets = inputs
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=True)
    return {name: torch.cat([net(batch) for batch in batches]).numpy() for name, batches in sets.items()}


def test_inputs_are_the_recorded_ones(golden, inputs):
    state, sets = inputs
    assert sha256_state_dict(state) == str(golden["weights_sha256"]), (
        "the random Inception weights are not the ones the golden file was recorded with; if that is "
        f"deliberate, re-record with {SCRIPT.name}")
    assert sha256_images(sets) == str(golden["images_sha256"]), "the fixed images changed; re-record on purpose only"
    # The fixed images exercise the resize both ways and on non-square inputs.
    sizes = {tuple(b.shape[-2:]) for batches in sets.values() for b in batches}
    assert any(h != w for h, w in sizes) and any(max(s) < 299 for s in sizes) and any(max(s) > 299 for s in sizes)


@pytest.mark.slow
def test_features_equal_torch_fidelity(golden, ours):
    for name in ("real", "fake"):
        ref = golden[f"features_{name}"]
        assert ours[name].shape == ref.shape == (3, 2048)
        np.testing.assert_allclose(ours[name], ref, rtol=0, atol=FEATURE_ATOL)
    # torchmetrics (antialias=False) ran torch-fidelity's network and resize: identical features.
    assert float(golden["torchmetrics_feature_max_abs_diff"]) == 0.0
    # The tolerance is far below the gap to pytorch-fid's pipeline, whose network is the same
    # (identical output on the same preprocessed input) but whose resize and scaling are not.
    assert float(golden["pytorch_fid_network_same_input_max_abs_diff"]) <= FEATURE_ATOL
    assert float(golden["pytorch_fid_pipeline_feature_max_abs_diff"]) > 1000 * FEATURE_ATOL


def test_fid_equals_torch_fidelity_and_torchmetrics(golden, ours):
    fid = fid_from_features(ours["real"], ours["fake"])
    assert fid == pytest.approx(float(golden["fid_exact_on_reference_features"]), rel=EXACT_FID_RTOL)
    assert fid == pytest.approx(float(golden["fid_torch_fidelity"]), rel=PACKAGE_FID_RTOL)
    assert fid == pytest.approx(float(golden["fid_torchmetrics"]), rel=PACKAGE_FID_RTOL)
    # pytorch-fid's full pipeline gives another number on the same images and weights.
    assert abs(float(golden["fid_pytorch_fid_pipeline"]) - fid) > 10 * PACKAGE_FID_RTOL * fid  # 1.0% recorded


def test_frechet_formula_equals_the_packages(golden):
    real, fake = formula_features()
    a, b = FeatureStats.from_features(real), FeatureStats.from_features(fake)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    for package in ("torch_fidelity", "torchmetrics", "pytorch_fid"):
        assert ours == pytest.approx(float(golden[f"formula_{package}"]), rel=FORMULA_RTOL), package


def test_live_against_torch_fidelity(tmp_path, inputs, ours, golden):
    if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("torchmetrics") is None:
        pytest.skip(HOW_TO_RUN_LIVE)
    spec = importlib.util.spec_from_file_location("make_fidelity_reference", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    state, sets = inputs
    torch.save(state, tmp_path / "random-inception.pth")
    live = script.torch_fidelity_reference(tmp_path / "random-inception.pth", sets)
    fid = fid_from_features(ours["real"], ours["fake"])
    for name in ("real", "fake"):
        np.testing.assert_allclose(ours[name], live[f"features_{name}"], rtol=0, atol=FEATURE_ATOL)
        np.testing.assert_allclose(live[f"features_{name}"], golden[f"features_{name}"], rtol=0, atol=FEATURE_ATOL)
    assert live["torchmetrics_feature_max_abs_diff"] == 0.0
    assert fid == pytest.approx(live["fid_torch_fidelity"], rel=PACKAGE_FID_RTOL)
    assert fid == pytest.approx(live["fid_torchmetrics"], rel=PACKAGE_FID_RTOL)
    assert fid == pytest.approx(script.exact_fid(live["features_real"], live["features_fake"]), rel=EXACT_FID_RTOL)


# CLIP score ---------------------------------------------------------------------------------

CLIP_SIZES = [(48, 64), (100, 37), (20, 50), (45, 45), (64, 64)]


@pytest.fixture(scope="module", params=[(32, 32), (40, 32)], ids=["short32-crop32", "short40-crop32"])
def clip_pair(request, tmp_path_factory):
    """A tiny random CLIP folder with a saved CLIPImageProcessorPil config, our scorer on it, and
    the processor; once with the short side resized to the crop size, once larger than it."""
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessorPil

    from imagen_train.evaluation.clip_score import ClipScorer
    from sampling_helpers import build_tiny_clip

    shortest, crop = request.param
    folder = build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": shortest},
                          crop_size={"height": crop, "width": crop}).save_pretrained(str(folder))
    return ClipScorer(str(folder)), CLIPImageProcessorPil.from_pretrained(str(folder))


def test_clip_resize_truncates_the_long_side_as_the_processor_does(clip_pair):
    scorer, _ = clip_pair
    edge = scorer.shortest_edge
    assert scorer.resized_size(48, 64) == (edge, int(edge * 64 / 48))     # 32 x 42 at 32: not round()'s 43
    assert scorer.resized_size(97, 61) == (int(edge * 97 / 61), edge)
    assert scorer.resized_size(45, 45) == (edge, edge)


@pytest.mark.parametrize("size", CLIP_SIZES, ids=[f"{h}x{w}" for h, w in CLIP_SIZES])
def test_clip_preprocessing_and_cosines_equal_the_clip_image_processor(clip_pair, size):
    scorer, processor = clip_pair
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    h, w = size
    # Noise images (every pixel a different value) and smooth ones (a coarse grid upsampled).
    noise = rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)
    coarse = rng.uniform(0, 255, (2, 3, 6, 6)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear")
    images = torch.cat([torch.from_numpy(noise), smooth.round().clamp(0, 255).to(torch.uint8)])
    ref = processor(images=list(images.numpy()), input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    ours = scorer.preprocess(images)
    assert ours.shape == ref.shape == (4, 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)   # measured: identical
    captions = ["a red circle", "a blue square at the top", "a green triangle", "dog"]
    model = scorer.model
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=ref).pooler_output)
        tok = scorer.tokenizer(captions, padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    direct = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scorer.cosine(images, captions), direct, rtol=0, atol=1e-6)


def test_clip_refuses_a_crop_larger_than_the_resized_short_side(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessorPil

    from imagen_train.evaluation.clip_score import ClipScorer
    from sampling_helpers import build_tiny_clip

    folder = build_tiny_clip(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: crop_size \(32, 32\) does not fit in "
                                         r"size.shortest_edge 24"):
        ClipScorer(str(folder))
