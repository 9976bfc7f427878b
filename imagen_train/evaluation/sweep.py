"""FID-CLIP sweep over guidance scales (NeMo's evaluation protocol): one scale for all stages,
images at `target_resolution` (256 in the reference), FID against cached reference statistics,
CLIP score as the mean cosine. Distributed: each rank samples its share of the captions, the
Inception features and per-image cosines are gathered, rank 0 writes the table and the plot.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

from imagen_train.artifacts import stage_config
from imagen_train.config import ConfigError
from imagen_train.stages import STAGE_NAMES
from imagen_train.utils import dist
from .cascade import Precision, encode_prompts, generate, resolve_device
from .clip_score import ClipScorer
from .fid import FeatureStats, extract_features, fid_from_stats, to_uint8
from .inception import load_fid_inception
from .pipeline_config import InferencePipelineConfig
from .plot import plot_tradeoff


def read_captions(cfg: InferencePipelineConfig) -> list[str]:
    ev = cfg.evaluation
    if not ev.captions_file or not Path(ev.captions_file).is_file():
        raise ConfigError("evaluation.captions_file", "a text file with one caption a line", ev.captions_file)
    caps = [line.strip() for line in Path(ev.captions_file).read_text().splitlines() if line.strip()]
    return caps[: ev.max_captions] if ev.max_captions else caps


def with_guidance(cfg: InferencePipelineConfig, scale: float) -> InferencePipelineConfig:
    """`cfg` with every stage's guidance scale set to `scale`."""
    samplers = {s: dataclasses.replace(getattr(cfg.samplers, s), guidance_scale=scale)
                for s in STAGE_NAMES}
    return dataclasses.replace(cfg, samplers=dataclasses.replace(cfg.samplers, **samplers))


def run_sweep(cfg: InferencePipelineConfig, out_dir: str | Path) -> list[dict]:
    """Sample, score and (rank 0) write sweep.csv, sweep.md, sweep.png and sweep.json."""
    ev = cfg.evaluation
    device = resolve_device(cfg.device)
    # Everything that can be missing is checked before any sampling.
    reference = FeatureStats.load(ev.fid_stats_path, "evaluation.fid_stats_path")
    inception = load_fid_inception(ev.inception_path, device, "evaluation.inception_path")
    clip = ClipScorer(ev.clip_path, device, "evaluation.clip_path")
    captions = read_captions(cfg)
    rank, world = dist.rank(), dist.world_size()
    mine = captions[rank::world]
    max_length = max(stage_config(getattr(cfg.checkpoints, s)).text.max_length for s in cfg.stages)
    emb, mask, _ = encode_prompts(cfg.encoder_path, mine, device, max_length,
                                  Precision(cfg.inference_precision, device))
    rows = []
    for scale in ev.guidance_scales:
        start = time.perf_counter()
        result = generate(with_guidance(cfg, scale), mine, device, seed_offset=rank, text=(emb, mask))
        images = to_uint8(result.images)
        feats = extract_features(inception, images, ev.feature_batch_size, device).to(device)
        cos = clip.cosine(images, result.prompts, ev.feature_batch_size).to(device)
        feats, cos = dist.all_gather_tensor(feats).cpu(), dist.all_gather_tensor(cos).cpu()
        row = {"guidance_scale": scale, "fid": fid_from_stats(reference, FeatureStats.from_features(feats)),
               "clip_score": float(cos.mean()), "num_images": int(feats.shape[0]),
               "time_s": round(time.perf_counter() - start, 2)}
        rows.append(row)
        dist.print0(f"[evaluate] guidance {scale:g}: FID {row['fid']:.3f}, CLIP {row['clip_score']:.4f} "
                    f"({row['num_images']} images)")
    if dist.is_main():
        write_table(rows, Path(out_dir), cfg)
    dist.barrier()
    return rows


def write_table(rows: list[dict], out: Path, cfg: InferencePipelineConfig) -> None:
    """sweep.csv, sweep.md (markdown table), sweep.png (trade-off curve), sweep.json (settings)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["guidance_scale", "fid", "clip_score", "num_images", "time_s"]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"FID-CLIP sweep at {cfg.target_resolution} px (CLIP score = mean cosine, not 100x)", "",
             "| guidance | FID | CLIP score | images |", "|---|---|---|---|"]
    lines += [f"| {r['guidance_scale']:g} | {r['fid']:.3f} | {r['clip_score']:.4f} | {r['num_images']} |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_tradeoff(rows, out / "sweep.png", f"FID vs CLIP score ({cfg.target_resolution} px)")
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "settings": cfg.to_dict()}, indent=2))
