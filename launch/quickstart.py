"""The CPU quickstart: data, encoder, embeddings, two trained stages, cascaded samples, a report.

    python launch/quickstart.py                 # ~12 minutes on a 2-core CPU, no GPU, no network
    python launch/quickstart.py --short         # a few steps of everything (what CI runs)

Every step skips what is already done, so running it again resumes. Outputs go to
`runs/quickstart/` (see the report it writes there).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imagen_train.evaluation.grids import make_grid, save_png  # noqa: E402

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


def fid_over_training(args, out: Path, encoder: Path, base_dir: Path, holdout: Path) -> dict:
    """FID (64 px) of samples from each kept base checkpoint against the held-out images."""
    import torch

    from imagen_train.data import expand_shards, iter_raw_samples
    from imagen_train.evaluation.cascade import load_stage
    from imagen_train.evaluation.fid import extract_features, fid_from_features, to_uint8
    from imagen_train.evaluation.inception import FIDInceptionV3, load_fid_inception
    from imagen_train.diffusion import build_diffusion
    from imagen_train.config import SamplerConfig
    from imagen_train.text import load_text_encoder
    from imagen_train.training.checkpoint import list_complete
    from PIL import Image
    import io
    import numpy as np

    if args.inception:
        inception, extractor = load_fid_inception(args.inception), "Inception-v3 (pt_inception-2015-12-05 weights)"
    else:
        inception = FIDInceptionV3.random(seed=0)
        extractor = ("Inception-v3 with RANDOM weights (seed 0): no pre-trained weights offline; the numbers "
                     "track progress within this run only and are not comparable with published FID")
    real, captions = [], []
    for url in expand_shards("::".join(sorted(str(p) for p in holdout.glob("*.tar")))):
        for sample in iter_raw_samples(url):
            image = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((64, 64), Image.BICUBIC)
            real.append(torch.from_numpy(np.asarray(image)).permute(2, 0, 1))
            captions.append(sample["txt"].decode())
    real_features = extract_features(inception, torch.stack(real))
    text = load_text_encoder(encoder, "cpu", torch.float32, max_length=32)
    n = min(args.fid_samples, len(captions))
    emb, mask = text.encode(captions[:n], max_length=32, pad_to_max_length=True)
    sampler = SamplerConfig(name="edm_heun", steps=4 if args.short else 12, guidance_scale=BASE_GUIDANCE)
    points = {}
    for tag in list_complete(base_dir / "checkpoints"):
        net, cfg = load_stage(str(base_dir / "checkpoints" / tag), True, torch.device("cpu"), torch.float32)
        images = build_diffusion(cfg.diffusion).sample(
            net, (n, 3, 64, 64), emb, mask, sampler, generator=torch.Generator().manual_seed(0)).images
        points[tag] = round(fid_from_features(real_features, extract_features(inception, to_uint8(images))), 3)
        log(f"FID at {tag}: {points[tag]}")
    return {"feature_extractor": extractor, "real_images": len(real), "generated_per_point": n,
            "sampler": f"edm_heun {sampler.steps} steps, guidance {sampler.guidance_scale}", "by_checkpoint": points}


def score_prompt_following(images_by_size: dict[str, "torch.Tensor"], prompts: list[str]) -> dict:
    """Per size: the fractions of samples whose colour, kind, position and background, read back
    from their pixels (`data_tools.synthetic.read_shape`), match their prompt; overall and per prompt."""
    from data_tools.synthetic import prompt_following
    from imagen_train.evaluation.fid import to_uint8

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
    fid = metrics["fid_64px"]
    following = metrics["prompt_following"]
    follow_rows = "\n".join(
        f"| {size} | {prompt} | " + " | ".join(str(s[k]) for k in ("colour", "shape", "position", "background", "all")) + " |"
        for size, by_size in following.items()
        for prompt, s in [*by_size["by_prompt"].items(), ("**all prompts**", by_size["all_prompts"])])
    rows = "\n".join(f"| {tag} | {value} |" for tag, value in fid["by_checkpoint"].items())
    prompts = "\n".join(f"{i}. {p}" for i, p in enumerate(metrics["prompts"]))
    (out / "report.md").write_text(f"""# Quickstart report

Finished in {metrics['minutes']} minutes. The text encoder is a small random T5 (not pre-trained).

## Samples for prompts no training caption holds word for word (4 per prompt, one row each)
{prompts}

64 px (base stage): ![64 px](samples/grid-64.png)

256 px (64 -> 256 stage): ![256 px](samples/grid-256.png)

Per-prompt grids and PNGs: `samples/grids/`, `samples/images/`; settings and timings: `samples/settings.json`.

## Do the samples follow their prompts?
Each sample's shape is read back from its pixels (`data_tools.synthetic.read_shape`: background
from the border, the shape's colour, its kind from how it fills its bounding box, its position
from the box's centre); the table gives the fraction of samples whose attribute matches the
prompt ("all": colour, kind and position at once). Chance is 1/4 for colour, 1/3 for kind, 1/5 for
position.

| size | prompt | colour | kind | position | background | all |
|---|---|---|---|---|---|---|
{follow_rows}

## FID of the 64 px stage against {fid['real_images']} held-out images, over training
Feature extractor: {fid['feature_extractor']}.
{fid['generated_per_point']} generated images per point, {fid['sampler']}.

| checkpoint | FID |
|---|---|
{rows}

Last logged training loss: {metrics['train_loss_last']}.
Exported EMA weights: {metrics['exports']}.
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "quickstart"), help="output folder")
    parser.add_argument("--short", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--encoder", default=None,
                        help="a real T5 save_pretrained folder instead of the small random one built here")
    parser.add_argument("--samples", type=int, default=6000, help="synthetic training samples")
    parser.add_argument("--base-steps", type=int, default=1500, help="optimizer steps of the 64 px stage")
    parser.add_argument("--sr-steps", type=int, default=1200, help="optimizer steps of the 64->256 stage")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (CPU processes)")
    parser.add_argument("--inception", default=None,
                        help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth); without it "
                             "FID uses a randomly initialised Inception-v3 and says so")
    parser.add_argument("--fid-samples", type=int, default=64, help="generated images per FID point")
    args = parser.parse_args(argv)
    if args.short:
        args.samples, args.base_steps, args.sr_steps, args.fid_samples = 96, 4, 2, 8

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # 1. Draw the dataset (256 px: the base stage reads it at 64 px), with a held-out part.
    raw = out / "data" / "raw"
    if not (raw / "holdout").is_dir():
        data_tools("synthetic", "--out", str(raw), "--num-samples", str(args.samples), "--resolution", "256",
                   "--shard-size", "500", "--holdout", "0.05", "--seed", "0", "--sizes", "large",
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
    common = [f"data.train_shards={train_shards}", "checkpoint.keep_last=2"]
    base_dir, sr_dir = out / "base64", out / "sr256"
    train("quickstart-base64.yaml", base_dir, common + [f"training.max_steps={args.base_steps}",
                                                       f"checkpoint.every_steps={max(1, args.base_steps // 4)}",
                                                       "checkpoint.keep_last=4"],
          args.nproc)
    train("quickstart-sr256.yaml", sr_dir, common + [f"training.max_steps={args.sr_steps}",
                                              f"checkpoint.every_steps={max(1, args.sr_steps // 2)}"],
          args.nproc)

    # 6. Export the EMA weights of both stages.
    from imagen_train.artifacts import find_checkpoint
    from imagen_train.training.export import export_checkpoint
    exports = {}
    for name, run_dir in (("base64", base_dir), ("sr256", sr_dir)):
        exports[name] = export_checkpoint(find_checkpoint(run_dir / "checkpoints"), out / f"{name}-ema.safetensors")
        log(f"exported {exports[name]}")

    # 7. Cascaded sampling 64 -> 256 for prompts no training caption holds word for word.
    from imagen_train.evaluation.cascade import generate, write_outputs
    from imagen_train.evaluation.pipeline_config import InferencePipelineConfig
    from imagen_train.config import from_dict
    steps = {"base64": 4 if args.short else 30, "sr256": 2 if args.short else 12}
    pipeline = from_dict({
        "num_images_per_prompt": 4, "target_resolution": 256, "encoder_path": str(encoder),
        "checkpoints": {"base64": str(exports["base64"]), "sr256": str(exports["sr256"])},
        "texts": HELD_OUT_PROMPTS, "output_path": str(out / "samples"), "batch_size": 16, "device": "cpu",
        "samplers": {"base64": {"name": "edm_heun", "steps": steps["base64"], "guidance_scale": BASE_GUIDANCE},
                     "sr256": {"name": "edm_heun", "steps": steps["sr256"], "guidance_scale": 1.0,
                               "noise_aug_level": 0.25}}}, InferencePipelineConfig, "quickstart")
    log(f"sampling {len(HELD_OUT_PROMPTS)} new prompts, 64 -> 256")
    result = generate(pipeline, HELD_OUT_PROMPTS, keep_stage_images=True)
    write_outputs(pipeline, result, HELD_OUT_PROMPTS)
    save_png(make_grid(result.stage_images["base64"], ncols=4), out / "samples" / "grid-64.png")
    save_png(make_grid(result.images, ncols=4), out / "samples" / "grid-256.png")
    following = score_prompt_following({"64px": result.stage_images["base64"], "256px": result.images},
                                       result.prompts)
    log("prompt following (colour, kind, position all right): "
        + ", ".join(f"{size} {s['all_prompts']['all']:.0%}" for size, s in following.items()))

    # 8. FID of the 64 px stage against the held-out images, over the training checkpoints.
    fid = fid_over_training(args, out, encoder, base_dir, raw / "holdout")

    # 9. The report.
    minutes = round((time.time() - start) / 60, 2)
    metrics = {"minutes": minutes, "fid_64px": fid, "prompts": HELD_OUT_PROMPTS, "prompt_following": following,
               "exports": {k: str(v) for k, v in exports.items()},
               "train_loss_last": {name: last_loss(d) for name, d in (("base64", base_dir), ("sr256", sr_dir))}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics)
    log(f"done in {minutes} min: report {out / 'report.md'}, grids {out / 'samples'}, "
        f"W&B offline runs under {base_dir / 'wandb'} and {sr_dir / 'wandb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
