"""The CPU quickstart: data, encoder, embeddings, two trained stages, cascaded samples, a report.

    python launch/quickstart.py                 # ~18 minutes on a 2-core CPU, no GPU, no network
    python launch/quickstart.py --short         # a few steps of everything (what CI runs)

Every step skips what is already done, so running it again resumes. Outputs go to
`runs/quickstart/` (see the report it writes there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_tools.synthetic import background_std, prompt_following  # noqa: E402
from imagen_train.artifacts import export_checkpoint, find_checkpoint, list_complete, step_of  # noqa: E402
from imagen_train.config import SamplerConfig, from_dict  # noqa: E402
from imagen_train.data import SampleSpec, iter_samples  # noqa: E402
from imagen_train.diffusion import build_diffusion  # noqa: E402
from imagen_train.evaluation.cascade import generate, load_stage, write_outputs  # noqa: E402
from imagen_train.evaluation.fid import extract_features, fid_from_features, to_uint8  # noqa: E402
from imagen_train.evaluation.grids import make_grid, save_png  # noqa: E402
from imagen_train.evaluation.inception import load_fid_inception  # noqa: E402
from imagen_train.evaluation.pipeline_config import InferencePipelineConfig  # noqa: E402
from imagen_train.text import load_text_encoder  # noqa: E402

# Prompts whose combination of colour, shape and position no training caption holds word for
# word: the synthetic data is drawn without these combinations (see --exclude of `synthetic`).
HELD_OUT_PROMPTS = [
    "a large red square in the center on a dark background",
    "a large blue circle at the top left on a light background",
    "a large green triangle at the bottom right on a dark background",
    "a large yellow circle at the top right on a light background",
]
EXCLUDED_COMBINATIONS = ["red square in the center", "blue circle at the top left",
                         "green triangle at the bottom right", "yellow circle at the top right"]
BASE_GUIDANCE = 3.0
BASE_STEPS = 30  # Heun steps of the 64 px stage at sampling
# Both stages end on the mean of their conditional prediction over fresh noise draws at sigma 0.5
# (SamplerConfig.final_denoise_*): it takes the per-pixel grain of one draw's error off the flat
# backgrounds (docs/training.md, "Where the grain comes from").
FINAL_DENOISE_SIGMA = 0.5
FINAL_DENOISE_DRAWS = {"base64": 32, "sr256": 8}
SAMPLES_PER_PROMPT = 4


def log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_tools(*args: str) -> None:
    run([sys.executable, "-m", "data_tools", *args])


def train(stage_config: str, run_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / stage_config),
           "--set", f"run_dir={run_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    run(cmd, env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
                  "WANDB_MODE": "offline", "WANDB_SILENT": "true"})


def last_loss(run_dir: Path) -> float | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1])["train/loss"] if lines else None


def read_holdout(holdout: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """The held-out images (uint8, (N, 3, size, size), bicubic from 256 px) and their captions."""
    samples = list(iter_samples(sorted(str(p) for p in holdout.glob("*.tar")), SampleSpec.images(size)))
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


def final_denoise(args, stage: str) -> dict:
    """A stage's final denoising average (two draws in a --short run)."""
    return {"final_denoise_sigma": FINAL_DENOISE_SIGMA,
            "final_denoise_draws": 2 if args.short else FINAL_DENOISE_DRAWS[stage]}


def base_sampler(args) -> SamplerConfig:
    """The 64 px stage's sampler: at the end of the run and at every kept checkpoint."""
    return SamplerConfig(name="edm_heun", steps=4 if args.short else BASE_STEPS, guidance_scale=BASE_GUIDANCE,
                         **final_denoise(args, "base64"))


def describe(sampler: SamplerConfig) -> str:
    text = f"{sampler.name} {sampler.steps} steps, guidance {sampler.guidance_scale}"
    if sampler.noise_aug_level > 0:
        text += f", low-res image noise-augmented at level {sampler.noise_aug_level}"
    if sampler.final_denoise_sigma > 0:
        text += (f", then the mean of {sampler.final_denoise_draws} conditional predictions at sigma "
                 f"{sampler.final_denoise_sigma}")
    return text


def progress_over_training(args, encoder: Path, base_dir: Path) -> dict:
    """The read-back score of the held-out prompts (4 samples each) at every kept base checkpoint.

    Each checkpoint's EMA weights draw the same samples (same noise, the final sampler's settings);
    the score is the fraction whose colour, kind and place `read_shape` reads as the prompt's.
    """

    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(SAMPLES_PER_PROMPT)]
    text = load_text_encoder(encoder, "cpu", torch.float32, max_length=32)
    emb, mask = text.encode(prompts, max_length=32, pad_to_max_length=True)
    sampler = base_sampler(args)
    points = {}
    for tag in list_complete(base_dir / "checkpoints"):
        net, cfg = load_stage(str(base_dir / "checkpoints" / tag), True, torch.device("cpu"), torch.float32)
        images = build_diffusion(cfg.diffusion).sample(
            net, (len(prompts), 3, 64, 64), emb, mask, sampler,
            generator=torch.Generator().manual_seed(args.seed)).images
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        score = prompt_following(pixels, prompts)
        points[str(step_of(tag))] = {**score, "background_std_max": max(background_std(p) for p in pixels)}
        log(f"held-out prompts at step {step_of(tag)}: all right {score['all']:.0%}")
    return {"prompts": HELD_OUT_PROMPTS, "samples_per_prompt": SAMPLES_PER_PROMPT,
            "sampler": f"{describe(sampler)}, EMA weights",
            "by_step": points}


def fid_over_training(args, encoder: Path, base_dir: Path, holdout: Path) -> dict:
    """FID (64 px) of samples from each kept base checkpoint against the held-out images, with
    the pre-trained FID Inception weights given by --inception."""

    inception = load_fid_inception(args.inception)
    real, captions = read_holdout(holdout, 64)
    real_features = extract_features(inception, real)
    text = load_text_encoder(encoder, "cpu", torch.float32, max_length=32)
    n = min(args.fid_samples, len(captions))
    emb, mask = text.encode(captions[:n], max_length=32, pad_to_max_length=True)
    sampler = base_sampler(args)
    points = {}
    for tag in list_complete(base_dir / "checkpoints"):
        net, cfg = load_stage(str(base_dir / "checkpoints" / tag), True, torch.device("cpu"), torch.float32)
        images = build_diffusion(cfg.diffusion).sample(
            net, (n, 3, 64, 64), emb, mask, sampler, generator=torch.Generator().manual_seed(args.seed)).images
        fid = fid_from_features(real_features, extract_features(inception, to_uint8(images)))
        points[str(step_of(tag))] = round(fid, 3)
        log(f"FID at step {step_of(tag)}: {points[str(step_of(tag))]}")
    return {"feature_extractor": f"Inception-v3 with the weights of {Path(args.inception).name}",
            "real_images": len(real), "generated_per_point": n,
            "sampler": describe(sampler), "by_step": points}


def grain(pixels_by_size: dict[str, np.ndarray], prompts: list[str]) -> dict:
    """Per size: `background_std` (0-255) of every image (N, H, W, 3) uint8, their largest and
    median value, and the largest per prompt."""

    out = {}
    for size, pixels in pixels_by_size.items():
        stds = [background_std(p) for p in pixels]
        out[size] = {"max": max(stds), "median": sorted(stds)[len(stds) // 2],
                     "by_prompt": {p: max(v for v, q in zip(stds, prompts) if q == p) for p in dict.fromkeys(prompts)}}
    return out


def score_prompt_following(images_by_size: dict[str, "torch.Tensor"], prompts: list[str]) -> dict:
    """Per size: the fractions of samples whose colour, kind, position and background, read back
    from their pixels (`data_tools.synthetic.read_shape`), match their prompt; overall and per prompt."""

    scores = {}
    for size, images in images_by_size.items():
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
        by_prompt = {}
        for prompt in dict.fromkeys(prompts):
            rows = [i for i, q in enumerate(prompts) if q == prompt]
            by_prompt[prompt] = prompt_following(pixels[rows], [prompt] * len(rows))
        scores[size] = {"all_prompts": prompt_following(pixels, prompts), "by_prompt": by_prompt}
    return scores


def write_report(out: Path, metrics: dict) -> None:
    following, grains, progress = metrics["prompt_following"], metrics["background_std"], metrics["progress"]
    follow_rows = "\n".join(
        f"| {size} | {prompt} | " + " | ".join(str(s[k]) for k in ("colour", "shape", "position", "background", "all"))
        + f" | {grains['samples'][size]['by_prompt'].get(prompt, grains['samples'][size]['max'])} |"
        for size, by_size in following.items()
        for prompt, s in [*by_size["by_prompt"].items(), ("**all prompts**", by_size["all_prompts"])])
    progress_rows = "\n".join(
        f"| {step} | {p['colour']} | {p['shape']} | {p['position']} | {p['all']} | {p['background_std_max']} |"
        for step, p in progress["by_step"].items())
    data_grain = ", ".join(f"{size} {g['max']}" for size, g in grains["training_images"].items())
    prompts = "\n".join(f"{i}. {p}" for i, p in enumerate(metrics["prompts"]))
    fid = metrics["fid_64px"]
    if fid:
        fid_rows = "\n".join(f"| {step} | {value} |" for step, value in fid["by_step"].items())
        fid_part = f"""## FID of the 64 px stage against {fid['real_images']} held-out images, over training
Feature extractor: {fid['feature_extractor']}.
{fid['generated_per_point']} generated images per point, {fid['sampler']}.

| step | FID |
|---|---|
{fid_rows}
"""
    else:
        fid_part = """No FID: it needs the pre-trained FID Inception weights (`--inception`), which are not
downloaded here; with random weights its value did not follow training (docs/training.md).
"""
    (out / "report.md").write_text(f"""# Quickstart report

Finished in {metrics['minutes']} minutes (seed {metrics['seed']}). The text encoder is a small random T5 (not pre-trained).

## Samples for prompts no training caption holds word for word (4 per prompt, one row each)
{prompts}

64 px (base stage): ![64 px](samples/grid-64.png)

256 px (64 -> 256 stage): ![256 px](samples/grid-256.png)

Samplers (EMA weights): 64 px {metrics['samplers']['base64']}; 256 px {metrics['samplers']['sr256']}.

Per-prompt grids and PNGs: `samples/grids/`, `samples/images/`; settings and timings: `samples/settings.json`.

## Do the samples follow their prompts?
Each sample's shape is read back from its pixels (`data_tools.synthetic.read_shape`: background
from the border, the shape's colour, its kind from how it fills its bounding box, its position
from the box's centre); the table gives the fraction of samples whose attribute matches the
prompt ("all": colour, kind and position at once). Chance is 1/4 for colour, 1/3 for kind, 1/5 for
position. "grain" is the largest background std of the prompt's samples
(`data_tools.synthetic.background_std`, 0-255: the standard deviation of the pixels away from
the shape; the held-out training images measure {data_grain}).

| size | prompt | colour | kind | position | background | all | grain |
|---|---|---|---|---|---|---|---|
{follow_rows}

## Progress over training: the held-out prompts at every kept 64 px checkpoint
{progress['samples_per_prompt']} samples per prompt, {progress['sampler']}, the same noise at every
checkpoint; fractions read back as above, grain the largest background std.

| step | colour | kind | position | all | grain |
|---|---|---|---|---|---|
{progress_rows}

{fid_part}
Last logged training loss: {metrics['train_loss_last']}.
Exported EMA weights: {metrics['exports']}.
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/quickstart, runs/quickstart-seedN for --seed N > 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the dataset (data_tools synthetic --seed), seeds both stages' training "
                             "(weights, noise, data order: training.seed and data.seed) and the sampling noise")
    parser.add_argument("--short", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--encoder", default=None,
                        help="a real T5 save_pretrained folder instead of the small random one built here")
    parser.add_argument("--samples", type=int, default=6000, help="synthetic training samples")
    parser.add_argument("--base-steps", type=int, default=2400, help="optimizer steps of the 64 px stage")
    parser.add_argument("--sr-steps", type=int, default=2400, help="optimizer steps of the 64->256 stage")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (CPU processes)")
    parser.add_argument("--inception", default=None,
                        help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth): adds the FID "
                             "of each kept base checkpoint against the held-out images to the report")
    parser.add_argument("--fid-samples", type=int, default=64, help="generated images per FID point")
    args = parser.parse_args(argv)
    if args.short:
        args.samples, args.base_steps, args.sr_steps, args.fid_samples = 96, 4, 2, 8

    out = Path(args.out or REPO / "runs" / ("quickstart" if args.seed == 0 else f"quickstart-seed{args.seed}"))
    out.mkdir(parents=True, exist_ok=True)
    drawn = out / "seed.json"
    if drawn.is_file() and json.loads(drawn.read_text())["seed"] != args.seed:
        parser.error(f"{out} holds a run of --seed {json.loads(drawn.read_text())['seed']}; "
                     f"give another --out for --seed {args.seed}")
    drawn.write_text(json.dumps({"seed": args.seed}))
    start = time.time()

    # 1. Draw the dataset (256 px: the base stage reads it at 64 px), with a held-out part.
    raw = out / "data" / "raw"
    if not (raw / "holdout").is_dir():
        data_tools("synthetic", "--out", str(raw), "--num-samples", str(args.samples), "--resolution", "256",
                   "--shard-size", "500", "--holdout", "0.05", "--seed", str(args.seed), "--sizes", "large",
                   *[arg for combo in EXCLUDED_COMBINATIONS for arg in ("--exclude", combo)])
    train_raw = ",".join(sorted(str(p) for p in raw.glob("*.tar")))

    # 2. A text encoder: a small random T5 with a tokenizer trained on the captions, unless a
    #    real one is given.
    encoder = Path(args.encoder) if args.encoder else out / "encoder"
    if not args.encoder and not (encoder / "config.json").is_file():
        data_tools("make-encoder", "--shards", str(raw / "00000.tar"), "--out", str(encoder))

    # 3. Embeddings of every caption, stored beside the samples.
    emb, emb_holdout = out / "data" / "emb", out / "data" / "emb-holdout"
    for src, dst in ((raw, emb), (raw / "holdout", emb_holdout)):
        shards = "::".join(sorted(str(p) for p in src.glob("*.tar")))
        data_tools("precompute-embeddings", "--shards", shards, "--encoder", str(encoder), "--out", str(dst),
                   "--max-length", "32", "--no-progress")
    train_shards = "::".join(sorted(str(p) for p in emb.glob("*.tar")))
    del train_raw

    # 4-5. Train the 64 px base stage and the 64 -> 256 stage on 2 CPU ranks (ZeRO-2, fp32).
    common = [f"data.train_shards={train_shards}", "checkpoint.keep_last=2", f"training.seed={args.seed}",
              f"data.seed={args.seed}"]
    base_dir, sr_dir = out / "base64", out / "sr256"
    train("quickstart-base64.yaml", base_dir, common + [f"training.max_steps={args.base_steps}",
                                                       f"checkpoint.every_steps={max(1, args.base_steps // 4)}",
                                                       "checkpoint.keep_last=4"],
          args.nproc)
    train("quickstart-sr256.yaml", sr_dir, common + [f"training.max_steps={args.sr_steps}",
                                              f"checkpoint.every_steps={max(1, args.sr_steps // 2)}"],
          args.nproc)

    # 6. Export the EMA weights of both stages.
    exports = {}
    for name, run_dir in (("base64", base_dir), ("sr256", sr_dir)):
        exports[name] = export_checkpoint(find_checkpoint(run_dir / "checkpoints"), out / f"{name}-ema.safetensors")
        log(f"exported {exports[name]}")

    # 7. Cascaded sampling 64 -> 256 for prompts no training caption holds word for word.
    samplers = {"base64": dataclasses.asdict(base_sampler(args)),
                "sr256": dataclasses.asdict(SamplerConfig(name="edm_heun", steps=2 if args.short else 12,
                                                          guidance_scale=1.0, noise_aug_level=0.25,
                                                          **final_denoise(args, "sr256")))}
    pipeline = from_dict({
        "target_resolution": 256, "encoder_path": str(encoder),
        "checkpoints": {"base64": str(exports["base64"]), "sr256": str(exports["sr256"])},
        "num_images_per_prompt": SAMPLES_PER_PROMPT, "texts": HELD_OUT_PROMPTS, "output_path": str(out / "samples"),
        "batch_size": 16, "device": "cpu", "seed": args.seed,
        "samplers": samplers}, InferencePipelineConfig, "quickstart")
    log(f"sampling {len(HELD_OUT_PROMPTS)} new prompts, 64 -> 256")
    result = generate(pipeline, HELD_OUT_PROMPTS, keep_stage_images=True)
    write_outputs(pipeline, result, HELD_OUT_PROMPTS)
    save_png(make_grid(result.stage_images["base64"], ncols=4), out / "samples" / "grid-64.png")
    save_png(make_grid(result.images, ncols=4), out / "samples" / "grid-256.png")
    following = score_prompt_following({"64px": result.stage_images["base64"], "256px": result.images},
                                       result.prompts)
    log("prompt following (colour, kind, position all right): "
        + ", ".join(f"{size} {s['all_prompts']['all']:.0%}" for size, s in following.items()))
    samples_grain = grain({size: to_uint8(x).permute(0, 2, 3, 1).numpy()
                           for size, x in (("64px", result.stage_images["base64"]), ("256px", result.images))},
                          result.prompts)
    holdout = raw / "holdout"
    data_grain = {}
    for size in (64, 256):
        real, captions = read_holdout(holdout, size)
        data_grain[f"{size}px"] = grain({"x": real.permute(0, 2, 3, 1).numpy()}, captions)["x"]
        del data_grain[f"{size}px"]["by_prompt"]
    log("background std (0-255, largest): samples " + ", ".join(f"{k} {v['max']}" for k, v in samples_grain.items())
        + "; training images " + ", ".join(f"{k} {v['max']}" for k, v in data_grain.items()))

    # 8. The held-out prompts' score at every kept base checkpoint (and FID, given real Inception weights).
    progress = progress_over_training(args, encoder, base_dir)
    fid = fid_over_training(args, encoder, base_dir, holdout) if args.inception else None

    # 9. The report.
    minutes = round((time.time() - start) / 60, 2)
    metrics = {"minutes": minutes, "seed": args.seed, "prompts": HELD_OUT_PROMPTS,
               "samplers": {stage: describe(pipeline.sampler_for(stage)) for stage in samplers},
               "prompt_following": following,
               "background_std": {"samples": samples_grain, "training_images": data_grain},
               "progress": progress, "fid_64px": fid,
               "exports": {k: str(v) for k, v in exports.items()},
               "train_loss_last": {name: last_loss(d) for name, d in (("base64", base_dir), ("sr256", sr_dir))}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics)
    log(f"done in {minutes} min: report {out / 'report.md'}, grids {out / 'samples'}, "
        f"W&B offline runs under {base_dir / 'wandb'} and {sr_dir / 'wandb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
