"""Fréchet Inception Distance (Heusel et al. 2017) on 2048-d pool3 features.

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), statistics in float64; the trace of
the matrix square root from symmetric eigendecompositions (see `frechet_distance`). On the same
statistics it equals torch-fidelity's, torchmetrics' and pytorch-fid's formulas to round-off
(tests/test_fidelity.py); the features it is fed decide which published FID it is (see
inception.py: ours are torch-fidelity's, not pytorch-fid's).

Reference statistics are cached in an .npz with `mu`, `sigma`, `num_samples` and `pipeline`
(`python -m data_tools fid-stats` writes it). `FeatureStats.load` refuses a file whose `pipeline`
is missing or is not ours (`inception.FID_PIPELINE`): pytorch-fid's statistics files, or any
other whose features came through another resize or scaling, would give a wrong FID without any
error. Statistics known to come from the same pipeline (torch-fidelity, or torchmetrics with
antialias=False, with the TF-Inception weights) can be labelled on purpose by saving their mu and
sigma again through `FeatureStats(mu, sigma, n).save(path, resolution=R)`. The file records the
size of the images it was computed from (`resolution`); an evaluation at another size is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from imagen_train.config import ConfigError

from .inception import FID_PIPELINE
from .weights import require_file


class FIDStatsPipelineError(ValueError):
    """Reference FID statistics that are not labelled as computed by our pipeline."""


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64. When there are no more samples
    than dimensions the features are kept too, for the exact low-rank FID (`frechet_distance`)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    features: Optional[np.ndarray] = None

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray) -> "FeatureStats":
        """Statistics of features (N, D); N >= 2 (unbiased covariance, as pytorch-fid)."""
        f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 feature vectors (N, D); got shape {f.shape}")
        keep = f if f.shape[0] <= f.shape[1] else None
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), int(f.shape[0]), keep)

    def save(self, path: str | Path, **meta: str) -> Path:
        """Write an .npz with mu, sigma, num_samples, the pipeline label (`FID_PIPELINE`) and string
        metadata. Saving states that the statistics come from our pipeline."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, num_samples=self.num_samples, pipeline=np.array(FID_PIPELINE),
                 **{k: np.array(str(v)) for k, v in meta.items()})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, setting: str = "evaluation.fid_stats_path",
             resolution: Optional[int] = None) -> "FeatureStats":
        """Read an .npz written by `save`; refuse one that does not carry our pipeline label, or
        (given `resolution`) whose images were of another size."""
        file = require_fid_stats(path, setting, resolution)
        with np.load(file) as data:
            n = int(data["num_samples"]) if "num_samples" in data else -1
            return cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n)


def require_fid_stats(path: Optional[str | Path], setting: str = "evaluation.fid_stats_path",
                      resolution: Optional[int] = None) -> Path:
    """The statistics file at `path`, if it exists and is labelled with our `FID_PIPELINE`; else
    MissingWeightsError or FIDStatsPipelineError naming `setting`, the file and what to do. Given
    `resolution` (the size of the images the evaluation compares), a file of another resolution,
    or one that records none, is a ConfigError naming both. Reads only the labels, so start-up
    checks stay cheap."""
    file = require_file(str(path) if path else None, setting,
                        "reference FID statistics (an .npz from `python -m data_tools fid-stats`)")
    with np.load(file) as data:
        label = str(data["pipeline"]) if "pipeline" in data else None
        saved = str(data["resolution"]) if "resolution" in data else None
    if label != FID_PIPELINE:
        found = "carry no pipeline label" if label is None else f"are labelled {label!r}"
        raise FIDStatsPipelineError(
            f"{setting}={file}: these reference FID statistics {found}, so they may come from another "
            "FID pipeline (pytorch-fid's statistics files, for one, resize and scale differently) and "
            f"would give a wrong FID. Ours: {FID_PIPELINE}. Recompute them with `python -m data_tools "
            "fid-stats --shards ... --inception ... --out FILE`; or, if they come from torch-fidelity or "
            "torchmetrics (antialias=False) with the TF-Inception weights, label them on purpose: "
            "FeatureStats(mu, sigma, n).save(FILE, resolution=R).")
    if resolution is not None and saved != str(resolution):
        found = "records no image resolution" if saved is None else f"holds statistics of {saved} px images"
        raise ConfigError(setting, f"statistics of {resolution} px images (the size this evaluation compares; "
                          f"`data_tools fid-stats --resolution {resolution}` makes them)", f"{file}, which {found}")
    return file


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), which is similar to S1 S2: the same number
    scipy.linalg.sqrtm(S1 @ S2) gives (tests check it), but with two symmetric eigendecompositions
    (~1 s at D = 2048, where sqrtm takes ~20 s on a small CPU) and robust when N < D makes the
    covariances singular.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    root1 = _sqrt_psd(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_lowrank(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance from the features a (Na, D), b (Nb, D) when Na, Nb <= D, exactly.

    With centred features A, B: S_a = A^T A / (Na - 1), and the nonzero eigenvalues of S_a S_b are
    the squared singular values of A B^T / sqrt((Na - 1)(Nb - 1)), so Tr((S_a S_b)^(1/2)) is
    their sum: an (Na x Nb) SVD instead of (D x D) decompositions.
    """
    A, B = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    tr_covmean = float(np.linalg.svd(A @ B.T / scale, compute_uv=False).sum())
    diff = a.mean(0) - b.mean(0)
    return float(diff.dot(diff) + (A * A).sum() / (len(a) - 1) + (B * B).sum() / (len(b) - 1) - 2 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of statistics (low-rank path when both kept their features)."""
    if a.features is not None and b.features is not None:
        return frechet_distance_lowrank(a.features, b.features)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def fid_from_features(real: Tensor | np.ndarray, fake: Tensor | np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return fid_from_stats(FeatureStats.from_features(real), FeatureStats.from_features(fake))


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype, unclamped) -> uint8 in [0, 255], as saved to PNG."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def extract_features(net: Callable[[Tensor], Tensor], images: Iterable[Tensor] | Tensor,
                     batch_size: int = 32, device: Optional[torch.device | str] = None) -> Tensor:
    """Run `net` (uint8 (N,3,H,W) -> (N,D)) over images (a tensor or batches); (N, D) float32 on CPU."""
    if torch.is_tensor(images):
        images = images.split(batch_size)
    out = []
    for batch in images:
        if device is not None:
            batch = batch.to(device)
        out.append(net(batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2048)


__all__ = ["FeatureStats", "FIDStatsPipelineError", "require_fid_stats", "frechet_distance", "frechet_distance_lowrank", "fid_from_stats", "fid_from_features", "to_uint8",
           "extract_features"]
