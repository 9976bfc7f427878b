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
from .grids import save_png, to_pil
from .fid import FeatureStats, extract_features, fid_from_stats, require_fid_stats, to_uint8
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


def sweep_pipeline(cfg: InferencePipelineConfig) -> InferencePipelineConfig:
    """The pipeline the sweep samples with: up to `evaluation.resolution`, with
    `evaluation.images_per_caption` images per caption (the sampling settings stay as they are)."""
    ev = cfg.evaluation
    return dataclasses.replace(cfg, target_resolution=ev.resolution, num_images_per_prompt=ev.images_per_caption)


def check_sweep_inputs(cfg: InferencePipelineConfig) -> list[str]:
    """Refuse, before anything loads, a sweep missing a file it reads or whose reference
    statistics are of another resolution; returns the captions."""
    ev = cfg.evaluation
    if not cfg.encoder_path or not Path(cfg.encoder_path).is_dir():
        raise ConfigError("encoder_path", "a local T5 save_pretrained folder (the one the training "
                          "embeddings came from; nothing is downloaded)", cfg.encoder_path)
    for stage in cfg.stages:
        path = getattr(cfg.checkpoints, stage)
        if not Path(path).exists():
            raise ConfigError(f"checkpoints.{stage}", f"an export or checkpoint folder (evaluation.resolution "
                              f"{ev.resolution} runs stage {stage})", f"{path} (does not exist)")
    require_fid_stats(ev.fid_stats_path, "evaluation.fid_stats_path", ev.resolution)
    return read_captions(cfg)


def run_sweep(cfg: InferencePipelineConfig, out_dir: str | Path) -> list[dict]:
    """Sample, score and (rank 0) write sweep.csv, sweep.md, sweep.png and sweep.json."""
    cfg = sweep_pipeline(cfg)
    ev = cfg.evaluation
    device = resolve_device(cfg.device)
    # Everything that can be missing is checked before any sampling.
    captions = check_sweep_inputs(cfg)
    reference = FeatureStats.load(ev.fid_stats_path, "evaluation.fid_stats_path", ev.resolution)
    inception = load_fid_inception(ev.inception_path, device, "evaluation.inception_path")
    clip = ClipScorer(ev.clip_path, device, "evaluation.clip_path")
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
        if ev.save_images:  # each rank writes its own images, numbered so that ranks never collide
            for i, image in enumerate(result.images):
                save_png(to_pil(image), Path(out_dir) / "images" / f"g{scale:g}" / f"{rank + world * i:05d}.png")
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
        write_table(rows, Path(out_dir), cfg, clip_model(clip, ev.clip_path))
    dist.barrier()
    return rows


def clip_model(clip: ClipScorer, path: str) -> str:
    """Which CLIP scored: the folder and its vision tower (ViT-L/14: patch 14, 224 px, width 1024)."""
    vision = clip.model.config.vision_config
    return f"{path} (ViT, patch {vision.patch_size}, {vision.image_size} px, width {vision.hidden_size})"


def write_table(rows: list[dict], out: Path, cfg: InferencePipelineConfig, clip: str = "") -> None:
    """sweep.csv, sweep.md (markdown table), sweep.png (trade-off curve), sweep.json (settings)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["guidance_scale", "fid", "clip_score", "num_images", "time_s"]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"FID-CLIP sweep at {cfg.target_resolution} px, {cfg.num_images_per_prompt} image(s) per caption "
             f"(CLIP score = mean cosine, not 100x; CLIP: {clip})", "",
             "| guidance | FID | CLIP score | images |", "|---|---|---|---|"]
    lines += [f"| {r['guidance_scale']:g} | {r['fid']:.3f} | {r['clip_score']:.4f} | {r['num_images']} |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_tradeoff(rows, out / "sweep.png", f"FID vs CLIP score ({cfg.target_resolution} px)")
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "clip_model": clip, "settings": cfg.to_dict()},
                                               indent=2))
