"""Evaluation: cascaded sampling, FID (our TF-compatible Inception-v3), CLIP score, sample grids
and the periodic evaluator used during training. Heavy modules are imported where used."""

from .fid import FeatureStats, fid_from_features, fid_from_stats, frechet_distance, to_uint8
from .weights import MissingWeightsError

__all__ = ["FeatureStats", "fid_from_features", "fid_from_stats", "frechet_distance", "to_uint8",
           "MissingWeightsError"]
