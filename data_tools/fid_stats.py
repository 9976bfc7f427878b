"""`fid-stats`: reference FID statistics (mean, covariance of Inception pool3 features) of the
images in a shard set, computed once and cached in an .npz.

Images are prepared as in the reference protocol: smallest side resized to `--resolution`
(bicubic, anti-aliased), center crop; the Inception then resizes them to 299 (TF-style
bilinear). Only the image entries are read; captions and embeddings are ignored.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterator, Optional

import torch

from data_tools.common import progress
from imagen_train.data import SampleSpec, iter_samples
from imagen_train.evaluation.fid import FeatureStats
from imagen_train.evaluation.inception import load_fid_inception


def iter_images(shards: str, resolution: int, max_samples: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (3, R, R) center crops of every decodable image in the shards, in shard order."""
    samples = iter_samples(shards, SampleSpec.images(resolution))
    yield from (s.image for s in (itertools.islice(samples, max_samples) if max_samples else samples))


def compute_fid_stats(shards: str, inception: str, out: str, resolution: int = 256, max_samples: int = 0,
                      batch_size: int = 32, device: Optional[str] = None, progress_bar: bool = True
                      ) -> dict[str, Any]:
    """Write `out` (.npz: mu, sigma, num_samples, the pipeline label, resolution, shards) and return a
    summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_fid_inception(inception, device, setting="--inception")
    start = time.perf_counter()
    feats, batch = [], []
    bar = progress(max_samples or None, "fid-stats", progress_bar)

    def flush() -> None:
        feats.append(net(torch.stack(batch).to(device)).float().cpu())
        bar.update(len(batch))
        batch.clear()

    for image in iter_images(shards, resolution, max_samples):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if not feats:
        raise SystemExit(f"fid-stats: no decodable image in {shards}")
    features = torch.cat(feats)
    stats = FeatureStats.from_features(features)
    stats.save(out, resolution=str(resolution), shards=shards)
    return {"out": out, "num_samples": stats.num_samples, "resolution": resolution,
            "feature_dim": int(features.shape[1]), "seconds": round(time.perf_counter() - start, 2)}


def add_parser(sub: Any) -> None:
    """Register the `fid-stats` subcommand."""
    p = sub.add_parser("fid-stats", help="reference FID statistics (.npz) of a shard set's images",
                       description=__doc__)
    p.add_argument("--shards", required=True, help="brace pattern, list file or `::`-joined shards")
    p.add_argument("--inception", required=True,
                   help="the local TF-Inception FID weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth (same keys)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--resolution", type=int, default=256, help="center-crop size before the Inception")
    p.add_argument("--max-samples", type=int, default=0, help="0: every image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda a: compute_fid_stats(a.shards, a.inception, a.out, a.resolution, a.max_samples,
                                                    a.batch_size, a.device, not a.no_progress))
