"""Record what the reference FID packages compute on fixed inputs: tests/golden/fidelity-reference.npz.

torch-fidelity (and torchmetrics, which runs torch-fidelity's Inception) need torchvision, which
would replace this project's torch, so they live in a separate venv outside the repository:

    python3 -m venv ~/fid-refvenv
    ~/fid-refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    printf 'torch==2.14.1\\ntorchvision==0.29.1\\n' > /tmp/ref-constraints.txt
    ~/fid-refvenv/bin/pip install -c /tmp/ref-constraints.txt torch-fidelity torchmetrics pytorch-fid scipy pytest
    PYTHONPATH=$PWD ~/fid-refvenv/bin/python tests/golden/make_fidelity_reference.py --record

(from the repository root; without --record it prints the numbers and writes nothing). Re-record
only for a deliberate change of the inputs (tests/fidelity_inputs.py) or of a reference package,
and say which in the commit. The inputs are seeded random Inception weights and a few integer
images (tests/fidelity_inputs.py). Written: torch-fidelity's pool3 features of every image, the
FID between the two sets from torch-fidelity's own formula and from torchmetrics'
FrechetInceptionDistance(antialias=False), the exact FID of torch-fidelity's features (float64, see
`exact_fid`), the three packages' Fréchet distance formulas on well-conditioned statistics, the sha256 of weights and images, the package versions,
and, for the record only, pytorch-fid's full pipeline on the same weights (its FID, and how far its
features are from torch-fidelity's) and pytorch-fid's network on torch-fidelity's preprocessed
input (how far from torch-fidelity: the networks agree, the preprocessing does not).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for fidelity_inputs

from fidelity_inputs import (draw_images, formula_features, inception_state_dict, sha256_images,  # noqa: E402
                             sha256_state_dict)

GOLDEN = HERE / "fidelity-reference.npz"


def torch_fidelity_reference(weights: Path, sets: dict) -> dict:
    """torch-fidelity's features and FID, and torchmetrics' FID (antialias=False)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    feats = {name: torch.cat([net(batch)[0] for batch in batches]) for name, batches in sets.items()}
    fid_tf = fid_statistics_to_metric(fid_features_to_statistics(feats["real"]),
                                      fid_features_to_statistics(feats["fake"]), verbose=False)["frechet_inception_distance"]
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), antialias=False)
    tm_feats = {name: torch.cat([metric.inception(batch) for batch in batches]) for name, batches in sets.items()}
    for name, batches in sets.items():
        for batch in batches:
            metric.update(batch, real=name == "real")
    return {"features_real": feats["real"].numpy(), "features_fake": feats["fake"].numpy(),
            "fid_torch_fidelity": float(fid_tf), "fid_torchmetrics": float(metric.compute()),
            "torchmetrics_feature_max_abs_diff": float(max((tm_feats[k] - feats[k]).abs().max() for k in feats))}


def exact_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two small feature sets (N <= D) in float64, exactly: Tr((S_a S_b)^(1/2)) from the
    eigenvalues of the (Na x Na) product (A B^T)(B A^T) / ((Na-1)(Nb-1)), which holds the nonzero
    spectrum of S_a S_b. The packages' own D x D formulas carry round-off of ~1e-5 relative here,
    where 3 samples make both covariances singular."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    A, B = a - a.mean(0), b - b.mean(0)
    eig = np.linalg.eigvals((A @ B.T) @ (B @ A.T) / ((len(a) - 1) * (len(b) - 1))).real
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (A * A).sum() / (len(a) - 1) + (B * B).sum() / (len(b) - 1)
                 - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def formula_reference() -> dict:
    """The three packages' Fréchet distance formulas on well-conditioned statistics."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    real, fake = formula_features()
    (m1, s1), (m2, s2) = [(f.mean(0), np.cov(f, rowvar=False)) for f in (real, fake)]
    return {"formula_torch_fidelity": fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2},
                                                               verbose=False)["frechet_inception_distance"],
            "formula_torchmetrics": float(_compute_fid(*[torch.from_numpy(x) for x in (m1, s1, m2, s2)])),
            "formula_pytorch_fid": float(calculate_frechet_distance(m1, s1, m2, s2))}


def pytorch_fid_pipeline(state: dict, sets: dict, reference: dict) -> dict:
    """pytorch-fid's InceptionV3 on the same weights: its own full pipeline (bilinear resize with
    half-pixel centres, 2 * (x / 255) - 1), and its network fed torch-fidelity's preprocessing."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    pfi.load_state_dict_from_url = lambda *args, **kwargs: state  # its loader would download the real file
    full = pfi.InceptionV3([3]).eval()
    bare = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    feats, bare_diff = {}, 0.0
    with torch.no_grad():
        for name, batches in sets.items():
            feats[name] = torch.cat([full(b.float() / 255)[0].flatten(1) for b in batches]).double().numpy()
            tf1 = [(interpolate_bilinear_2d_like_tensorflow1x(b.float(), size=(299, 299), align_corners=False) - 128) / 128
                   for b in batches]
            ours = torch.cat([bare(x)[0].flatten(1) for x in tf1]).numpy()
            bare_diff = max(bare_diff, float(np.abs(ours - reference[f"features_{name}"]).max()))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (feats["real"], feats["fake"])]
    return {"fid_pytorch_fid_pipeline": float(calculate_frechet_distance(*stats[0], *stats[1])),
            "pytorch_fid_pipeline_feature_max_abs_diff": float(max(
                np.abs(feats[k] - reference[f"features_{k}"]).max() for k in feats)),
            "pytorch_fid_network_same_input_max_abs_diff": bare_diff}


def main(argv: list[str] | None = None) -> None:
    """Compute the reference numbers; print them, and write the golden file with --record."""
    import pytorch_fid
    import torch_fidelity
    import torchmetrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write {GOLDEN.relative_to(HERE.parent.parent)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    state, sets = inception_state_dict(), draw_images()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random-inception.pth"
        torch.save(state, weights)
        ref = torch_fidelity_reference(weights, sets)
    ref["fid_exact_on_reference_features"] = exact_fid(ref["features_real"], ref["features_fake"])
    ref.update(formula_reference())
    ref.update(pytorch_fid_pipeline(state, sets, ref))
    ref.update(weights_sha256=sha256_state_dict(state), images_sha256=sha256_images(sets),
               versions=(f"torch {torch.__version__}, torch-fidelity {torch_fidelity.__version__}, "
                         f"torchmetrics {torchmetrics.__version__}, pytorch-fid {pytorch_fid.__version__}, "
                         f"numpy {np.__version__}"))
    for key, value in ref.items():
        print(f"{key}: {value.shape if isinstance(value, np.ndarray) else value}")
    if args.record:
        np.savez_compressed(GOLDEN, **{k: np.asarray(v) for k, v in ref.items()})
        print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
