"""The fixed inputs of the FID fidelity check (tests/test_fidelity.py and
tests/golden/make_fidelity_reference.py): seeded random Inception-v3 weights and a few images.

No pre-trained Inception weights exist on the development machines, so our pipeline and the
reference packages are compared on the same random weights. Both are drawn with NumPy only
(float64 normals cast to float32, integer images), never with torch, so the project's torch and
the reference venv's torch build the same bytes; `sha256` of both goes into the golden file and
the test checks it, so a change in how they are drawn fails loudly instead of comparing
different inputs. The weights follow torchvision's `Inception3` key layout, which is the layout of
our `FIDInceptionV3` and of torch-fidelity's `FeatureExtractorInceptionV3` (and pytorch-fid's
wrapped `fid_inception_v3`), so one state dict loads into all of them with strict=True.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from imagen_train.evaluation.inception import FIDInceptionV3

WEIGHTS_SEED = 2015
IMAGES_SEED = 1205
# (set, height, width, count): non-square sizes above and below 299 so the TF1 resize is
# exercised both ways; each row is one batch (a batch shares a size). Few images: the Inception
# at 299 px costs ~0.5 s an image on a 2-core CPU.
IMAGE_BATCHES = (("real", 48, 80, 2), ("real", 333, 250, 1), ("fake", 48, 80, 1), ("fake", 120, 90, 2))


def inception_state_dict(seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """A full state dict for the FID Inception: He-normal convolutions (scale-preserving, so the
    pool3 features are of order 1 and tell images apart), BatchNorm with random affine parameters
    and running statistics (so eps and the statistics matter), a small random fc."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, ref in FIDInceptionV3().state_dict().items():
        shape = tuple(ref.shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
            continue
        if key.endswith("conv.weight"):
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            value = rng.normal(0.0, 0.1, shape)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key == "fc.weight":
            value = rng.normal(0.0, 0.02, shape)
        elif key == "fc.bias":
            value = np.zeros(shape)
        else:
            raise KeyError(f"no rule to draw {key}")
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def draw_images(seed: int = IMAGES_SEED) -> dict[str, list[torch.Tensor]]:
    """{'real': [uint8 (n, 3, H, W), ...], 'fake': [...]}: per image a random integer colour ramp
    (smooth regions) with integer noise on half of the pixels (sharp detail). Integer arithmetic
    only, so any NumPy on any machine draws the same bytes."""
    rng = np.random.default_rng(seed)
    sets: dict[str, list[torch.Tensor]] = {"real": [], "fake": []}
    for name, h, w, count in IMAGE_BATCHES:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.int64)
        batch = np.empty((count, 3, h, w), np.uint8)
        for i in range(count):
            for c in range(3):
                a, b = rng.integers(-600, 600, size=2)
                ramp = (a * yy) // h + (b * xx) // w + int(rng.integers(0, 256))
                noise = rng.integers(-60, 61, size=(h, w)) * (rng.integers(0, 2, size=(h, w)))
                batch[i, c] = np.clip(ramp + noise, 0, 255).astype(np.uint8)
        sets[name].append(torch.from_numpy(batch))
    return sets


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Checksum of names, shapes, dtypes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def sha256_images(sets: dict[str, list[torch.Tensor]]) -> str:
    """Checksum of every batch's set name, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name in ("real", "fake"):
        for batch in sets[name]:
            digest.update(f"{name}:{tuple(batch.shape)}".encode())
            digest.update(batch.numpy().tobytes())
    return digest.hexdigest()


def formula_features(seed: int = IMAGES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two well-conditioned float64 feature sets (400, 48) and (300, 48) for checking the Fréchet
    distance formula alone: with N >> D the covariances are full rank, so every implementation's
    matrix square root is accurate and they must agree to round-off."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(48, 48))
    real = rng.normal(size=(400, 48)) @ mix
    fake = 1.2 * (rng.normal(size=(300, 48)) @ mix) + 0.4
    return real, fake
