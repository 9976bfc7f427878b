"""The CPU quickstart: data, encoder, embeddings, the three stages of the cascade trained, cascaded
samples at 64, 256 and 1024 px, and a report of what they show.

    python launch/quickstart.py                 # the whole cascade, 64 -> 256 -> 1024 px, on a 2-core CPU
    python launch/quickstart.py --to 256        # stop after the 64 -> 256 stage (--to 64: the base stage)
    python launch/quickstart.py --short         # a few steps of everything (what CI runs)

Every step skips what is already done, so running it again resumes. Outputs go to
`runs/quickstart/` (see the report it writes there; launch/quickstart_report.py measures it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.__main__ import main as data_tools_main  # noqa: E402
from data_tools.shape_edges import summarize  # noqa: E402
from data_tools.synthetic import background_std, prompt_following  # noqa: E402
from imagen_train.artifacts import (export_checkpoint, find_checkpoint, find_resume_tag, list_complete,  # noqa: E402
                                   step_of)
from imagen_train.config import SamplerConfig, from_dict  # noqa: E402
from imagen_train.diffusion import build_diffusion  # noqa: E402
from imagen_train.evaluation.cascade import (Precision, draw_stage, encode_prompts, generate, load_stage,  # noqa: E402
                                             run_stage, stage_seed, write_outputs)
from imagen_train.evaluation.fid import extract_features, fid_from_features, to_uint8  # noqa: E402
from imagen_train.evaluation.grids import make_grid, save_png, to_pil  # noqa: E402
from imagen_train.evaluation.inception import load_fid_inception  # noqa: E402
from imagen_train.evaluation.pipeline_config import InferencePipelineConfig  # noqa: E402
from imagen_train.utils.cpu_env import with_cpu_malloc_tunables  # noqa: E402
from imagen_train.text import load_text_encoder  # noqa: E402
from quickstart_report import (GRAIN_GOAL, SIZES, bicubic, edges, grain, read_holdout, score_prompt_following,  # noqa: E402
                               split_grid, to_pixels, write_report)

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
STAGES = ("base64", "sr256", "sr1024")
RESOLUTION = {"base64": 64, "sr256": 256, "sr1024": 1024}
# Each stage's sampler (EMA weights). Every stage ends on the mean of its conditional prediction
# over fresh noise draws (SamplerConfig.final_denoise_*; sigma 0.8 at 64 px, 0.5 at 256, 2 at 1024): it takes the
# per-pixel grain of one draw's error off the flat backgrounds (docs/training.md, "Where the grain
# comes from"). --short: a few steps and two draws.
SAMPLERS = {
    # sigma 0.8, not 0.5: grain 2.84 instead of 3.09 (goal 3), edges 1.99 px instead of 1.77, and
    # the 256 px stage then lifts 16 of 16 right (docs/training.md, "The 256 -> 1024 stage").
    "base64": dict(name="edm_heun", steps=30, guidance_scale=3.0, final_denoise_sigma=0.8, final_denoise_draws=32),
    "sr256": dict(name="edm_heun", steps=12, guidance_scale=1.0, noise_aug_level=0.25, final_denoise_sigma=0.5,
                  final_denoise_draws=8),
    # At 1024 px the grain is in what the sampler drew, not only in one draw's error: 16 draws at
    # sigma 0.5 kept 6/255; at sigma 2 the mean keeps the low-res image's shape and drops the texture.
    # Independent draws left 4.5/255 with the cosine-decayed stage; in antithetic pairs 2.5. Low-res
    # noise augmentation 0.1, not 0.25: at 0.25 the dark green triangle came out 40 levels darker
    # and only 2 % of it read back (a pass by a hair); at 0.1 5.5 % (docs/training.md, "The 256 -> 1024 stage").
    "sr1024": dict(name="edm_heun", steps=8, guidance_scale=1.0, noise_aug_level=0.1, final_denoise_sigma=2.0,
                   final_denoise_draws=8, final_denoise_antithetic=True),
}
SAMPLES_PER_PROMPT = {"base64": 4, "sr256": 4, "sr1024": 1}   # final samples per held-out prompt
EVAL_PER_PROMPT = {"sr256": 2, "sr1024": 1}                    # per prompt at each SR periodic evaluation
SAMPLE_BATCH = 16  # images per network call of the final 64 and 256 px samples (the noise is drawn per batch)


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
    """`python -m data_tools ARGS`, run in this process: seven new interpreters would spend ~2 s
    each importing torch before any work (14 s of the data phase's 39 s)."""
    log("$ python -m data_tools " + " ".join(args))
    status = data_tools_main(list(args))
    if status != 0:
        raise SystemExit(f"[quickstart] python -m data_tools {args[0]} failed (exit status {status}): see above")


def shard_list(folder: Path, sep: str = "::") -> str:
    return sep.join(sorted(str(p) for p in folder.glob("*.tar")))


def train(stage_config: str, run_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / stage_config),
           "--set", f"run_dir={run_dir}"]
    for item in overrides:
        cmd += ["--set", item]
    env = with_cpu_malloc_tunables()
    env.update(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               WANDB_MODE="offline", WANDB_SILENT="true")
    run(cmd, env=env)


def last_loss(run_dir: Path) -> float | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
    return losses[-1] if losses else None


def sampler(args, stage: str) -> SamplerConfig:
    """The stage's sampler: for its final samples, its periodic evaluation and its progress points."""
    settings = dict(SAMPLERS[stage])
    if args.short:
        settings.update(steps=2 if stage != "base64" else 4, final_denoise_draws=2)
    return SamplerConfig(**settings)


def describe(s: SamplerConfig) -> str:
    text = f"{s.name} {s.steps} steps, guidance {s.guidance_scale}"
    if s.noise_aug_level > 0:
        text += f", low-res image noise-augmented at level {s.noise_aug_level}"
    if s.final_denoise_sigma > 0:
        text += f", then the mean of {s.final_denoise_draws} conditional predictions at sigma {s.final_denoise_sigma}"
        if s.final_denoise_antithetic:
            text += ", in antithetic pairs"
    return text


class Timer:
    """Wall and CPU seconds per named phase of this invocation, in order.

    CPU seconds are user + system time of this process and of the children it has waited for
    (the DeepSpeed launcher and its ranks, the data tools): on a shared machine they say what a
    phase cost when its wall time is stretched by other work.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start, self.cpu = time.time(), cpu_seconds()

            def __exit__(self, *exc):
                timer.seconds[phase] = round(timer.seconds.get(phase, 0.0) + time.time() - self.start, 1)
                timer.cpu_seconds[phase] = round(timer.cpu_seconds.get(phase, 0.0) + cpu_seconds() - self.cpu, 1)
        return _Phase()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def per_stage_seconds(timer: Timer, stats: list) -> dict[str, dict[str, float]]:
    """Wall seconds per stage: data (the encoder and 256 px set under base64, whose 64 px images
    and the sr256 stage's both come from it; the 1024 px set under sr1024), train (with its
    periodic evaluation and export) and sample (the stage's share of the cascade's sampling)."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        data = {"base64": [k for k in timer.seconds if k.startswith("data:") and "1024" not in k],
                "sr256": [], "sr1024": [k for k in timer.seconds if k.startswith("data:") and "1024" in k]}[stage]
        train_s = sum(v for k, v in timer.seconds.items() if k.startswith("train:") and stage in k)
        sample_s = sum(s.time_s for s in stats if s.stage == stage)
        if train_s or sample_s:
            out[stage] = {"data": round(sum(timer.seconds[k] for k in data), 1), "train": round(train_s, 1),
                          "sample": round(sample_s, 1)}
    return out


# ----------------------------------------------------------------------------------------------
# Data, encoder, embeddings.

def draw_data(args, out: Path, timer: Timer) -> dict[str, Path]:
    """The 256 px dataset (the base stage reads it at 64 px) and, through 1024 px, a 1024 px one
    drawn from the same seed (the same first shapes), both with embeddings; returns the folders."""
    excludes = [arg for combo in EXCLUDED_COMBINATIONS for arg in ("--exclude", combo)]
    sets = [("256", args.samples, 500)] + ([("1024", args.hires_samples, 100)] if args.to == 1024 else [])
    folders: dict[str, Path] = {}
    for size, n, shard_size in sets:
        raw = out / "data" / ("raw" if size == "256" else f"raw{size}")
        if not (raw / "holdout").is_dir():
            with timer(f"data: draw {n} images at {size} px"):
                # --palette: the drawings hold two colours; palette PNGs decode ~10x faster, same pixels.
                data_tools("synthetic", "--out", str(raw), "--num-samples", str(n), "--resolution", size,
                           "--shard-size", str(shard_size), "--holdout", "0.05", "--seed", str(args.seed),
                           "--sizes", "large", "--palette", "--no-progress", *excludes)
        folders[f"raw{size}"] = raw
    encoder = Path(args.encoder) if args.encoder else out / "encoder"
    if not args.encoder and not (encoder / "config.json").is_file():
        with timer("data: text encoder"):
            data_tools("make-encoder", "--shards", str(folders["raw256"] / "00000.tar"), "--out", str(encoder))
    folders["encoder"] = encoder
    for size, _, _ in sets:
        raw = folders[f"raw{size}"]
        # The 256 px set keeps the folder names of the two-stage quickstart, so its runs resume.
        emb = "emb" if size == "256" else f"emb{size}"
        for src, name in ((raw, emb), (raw / "holdout", f"{emb}-holdout")):
            dst = out / "data" / name
            if len(list(dst.glob("*.tar"))) < len(list(src.glob("*.tar"))):  # else done: no process to start
                with timer(f"data: embeddings ({size} px)"):
                    data_tools("precompute-embeddings", "--shards", shard_list(src), "--encoder", str(encoder),
                               "--out", str(dst), "--max-length", "32", "--no-progress")
            folders[f"emb{size}" + name[len(emb):]] = dst
    return folders


# ----------------------------------------------------------------------------------------------
# Training, each stage exported as soon as it is trained.

def cascade_eval_overrides(args, stage: str, exports: dict[str, Path], folders: dict[str, Path],
                           every: int) -> list[str]:
    """The SR stage's periodic evaluation through the cascade: the held-out prompts drawn by the
    earlier stages' exports with their own samplers, lifted by the stage (evaluation.cascade_from)."""
    earlier = STAGES[:STAGES.index(stage)]
    sources = [{"path": str(exports[s]), "sampler": dataclasses.asdict(sampler(args, s))} for s in earlier]
    size = "1024" if stage == "sr1024" else "256"
    return [f"evaluation.eval_every_steps={every}", f"evaluation.prompts={json.dumps(HELD_OUT_PROMPTS)}",
            f"evaluation.num_images_per_prompt={EVAL_PER_PROMPT[stage]}",
            f"evaluation.sampler={json.dumps(dataclasses.asdict(sampler(args, stage)))}",
            f"evaluation.cascade_from={json.dumps(sources)}", f"evaluation.seed={args.seed}",
            # the last step's cascade is the final samples' (sample_cascade, the same weights)
            "evaluation.at_last_step=false",
            f"text.encoder_path={folders['encoder']}", f"data.eval_shards={shard_list(folders[f'emb{size}-holdout'])}"]


def train_stages(args, out: Path, folders: dict[str, Path], timer: Timer) -> dict[str, Path]:
    """Train (or resume) each stage up to --to on 2 CPU ranks (ZeRO-2, fp32) and export its EMA."""
    common = [f"training.seed={args.seed}", f"data.seed={args.seed}"]
    steps = {"base64": args.base_steps, "sr256": args.sr_steps, "sr1024": args.sr1024_steps}
    exports: dict[str, Path] = {}
    for stage in STAGES[:STAGES.index(STAGE_FOR[args.to]) + 1]:
        n = steps[stage]
        keep = 4 if stage == "base64" else 2
        every = max(1, n // keep)
        overrides = common + [f"data.train_shards={shard_list(folders['emb1024' if stage == 'sr1024' else 'emb256'])}",
                              f"training.max_steps={n}", f"checkpoint.every_steps={every}",
                              f"checkpoint.keep_last={keep}"]
        if stage != "base64":
            overrides += cascade_eval_overrides(args, stage, exports, folders, every)
        done = trained_to(out / stage / "checkpoints")
        if done == n:  # a re-run: no launch (its ranks' start-up alone costs ~10 CPU s)
            log(f"{stage}: trained to step {n} already ({out / stage / 'checkpoints'}), not launched again")
        else:
            with timer(f"train: {stage} ({n} steps)"):
                train(f"quickstart-{stage}.yaml", out / stage, overrides, args.nproc)
        with timer(f"train: export {stage}"):
            exports[stage] = export_checkpoint(find_checkpoint(out / stage / "checkpoints"),
                                               out / f"{stage}-ema.safetensors")
        log(f"exported {exports[stage]}")
    return exports


STAGE_FOR = {64: "base64", 256: "sr256", 1024: "sr1024"}


def trained_to(checkpoints: Path) -> "int | None":
    """The step of the checkpoint a launch would resume from (the newest that verifies), or None."""
    tag = find_resume_tag(checkpoints, log=log)
    return step_of(tag) if tag else None


# ----------------------------------------------------------------------------------------------
# Sampling.

def sample_cascade(args, out: Path, folders: dict[str, Path], exports: dict[str, Path], timer: Timer) -> dict:
    """The held-out prompts through every trained stage: 4 per prompt at 64 and 256 px, the first
    SAMPLES_PER_PROMPT['sr1024'] of each lifted to 1024 px. Returns each stage's images, before
    its final average too, its inputs and prompts (prompt-major rows)."""
    stages = STAGES[:STAGES.index(STAGE_FOR[args.to]) + 1]
    low_stages = stages[:2]
    samplers = {s: dataclasses.asdict(sampler(args, s)) for s in stages}
    pipeline = from_dict({
        "target_resolution": RESOLUTION[low_stages[-1]], "encoder_path": str(folders["encoder"]),
        "checkpoints": {s: str(exports[s]) for s in stages}, "num_images_per_prompt": SAMPLES_PER_PROMPT["base64"],
        "texts": HELD_OUT_PROMPTS, "output_path": str(out / "samples"), "batch_size": SAMPLE_BATCH, "device": "cpu",
        "seed": args.seed, "samplers": samplers}, InferencePipelineConfig, "quickstart")
    log(f"sampling {len(HELD_OUT_PROMPTS)} new prompts through {' -> '.join(stages)}")
    with timer("sample: " + " + ".join(low_stages)):
        result = generate(pipeline, HELD_OUT_PROMPTS, keep_stage_images=True)
        write_outputs(pipeline, result, HELD_OUT_PROMPTS)
    samples = {s: {"images": result.stage_images[s], "before_final": result.stage_images_before_final.get(s),
                   "inputs": result.stage_images[stages[i - 1]] if i else None, "prompts": result.prompts}
               for i, s in enumerate(low_stages)}
    stats = list(result.stats)
    if "sr1024" in stages:
        k, per = SAMPLES_PER_PROMPT["base64"], SAMPLES_PER_PROMPT["sr1024"]
        rows = [p * k + i for p in range(len(HELD_OUT_PROMPTS)) for i in range(per)]
        with timer("sample: sr1024"):
            device = torch.device("cpu")
            emb, mask = held_out_text(folders["encoder"])
            emb, mask = emb.repeat_interleave(per, 0), mask.repeat_interleave(per, 0)
            lowres = result.stage_images["sr256"][rows]
            images, s, before = run_stage(dataclasses.replace(pipeline, target_resolution=1024, batch_size=2),
                                          "sr1024", emb, mask, device, Precision(32, device), lowres,
                                          seed=stage_seed(args.seed, STAGES.index("sr1024")))
        stats.append(s)
        for row, image in enumerate(images):
            save_png(to_pil(image), out / "samples" / "images-1024" / f"p{row // per:03d}_i{row % per:02d}.png")
        samples["sr1024"] = {"images": images, "before_final": before, "inputs": lowres,
                             "prompts": [p for p in HELD_OUT_PROMPTS for _ in range(per)]}
    settings = out / "samples" / "settings.json"
    summary = json.loads(settings.read_text())
    summary["stages"] = [{**dataclasses.asdict(s), "images_per_s": s.images_per_s} for s in stats]
    summary["settings"]["samplers"] = samplers
    settings.write_text(json.dumps(summary, indent=2))
    return {"samples": samples, "samplers": {s: describe(sampler(args, s)) for s in stages}, "stats": stats}


def write_grids(out: Path, samples: dict) -> tuple[list[dict], str]:
    """One grid per size (a row per prompt; JPEG at 1024 px) and the bicubic baselines of the SR stages."""
    grids, baselines = [], []
    titles = {"base64": "64 px (base stage)", "sr256": "256 px (64 -> 256 stage)", "sr1024": "1024 px (256 -> 1024 stage)"}
    for stage, s in samples.items():
        size = RESOLUTION[stage]
        ncols = len(s["prompts"]) // len(HELD_OUT_PROMPTS)
        name = f"grid-{size}." + ("jpg" if size == 1024 else "png")
        grid = make_grid(s["images"], ncols=ncols)
        path = out / "samples" / name
        if size == 1024:
            grid.save(path, format="JPEG", quality=90)
        else:
            save_png(grid, path)
        grids.append({"title": titles[stage], "path": f"samples/{name}"})
        if s["inputs"] is not None:
            base = torch.from_numpy(bicubic(to_pixels(s["inputs"]), size)).permute(0, 3, 1, 2)
            bname = f"bicubic-{size}." + ("jpg" if size == 1024 else "png")
            bgrid = make_grid(base, ncols=ncols)
            if size == 1024:
                bgrid.save(out / "samples" / bname, format="JPEG", quality=90)
            else:
                save_png(bgrid, out / "samples" / bname)
            baselines.append(f"![bicubic {size} px](samples/{bname})")
    return grids, " ".join(baselines)


# ----------------------------------------------------------------------------------------------
# Measures over training.

def progress_over_training(args, encoder: Path, base_dir: Path, final: torch.Tensor) -> dict:
    """The read-back score of the held-out prompts (4 samples each) at every kept base checkpoint.

    Each checkpoint's EMA weights draw what the final samples drew (`draw_base_checkpoint`); the
    last checkpoint, the exported weights, drew `final` (the final 64 px samples), so its row reads
    those. The score is the fraction whose colour, kind and place `read_shape` reads as the prompt's.
    """
    per = SAMPLES_PER_PROMPT["base64"]
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(per)]
    last = find_checkpoint(base_dir / "checkpoints").name
    points = {}
    for tag in list_complete(base_dir / "checkpoints"):
        if tag == last:
            images, source = final, {"from": "final samples", "samples_per_prompt": per}
        else:
            images, source = draw_base_checkpoint(args, base_dir / "checkpoints" / tag, encoder), {}
        pixels = to_pixels(images)
        score = prompt_following(pixels, prompts)
        points[str(step_of(tag))] = {**score, "background_std_max": max(background_std(p) for p in pixels), **source}
        log(f"held-out prompts at step {step_of(tag)}: all right {score['all']:.0%}")
    return {"prompts": HELD_OUT_PROMPTS, "samples_per_prompt": per,
            "sampler": f"{describe(sampler(args, 'base64'))}, EMA weights", "by_step": points}


@functools.lru_cache(maxsize=1)
def held_out_text(encoder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out prompts encoded once (emb (P, L, D), mask (P, L)), as the cascade encodes them."""
    device = torch.device("cpu")
    emb, mask, _ = encode_prompts(str(encoder), HELD_OUT_PROMPTS, device, 32, Precision(32, device))
    return emb, mask


def draw_base_checkpoint(args, checkpoint: Path, encoder: Path) -> torch.Tensor:
    """The final 64 px samples' draw (prompts, noise, sampler: `sample_cascade`'s base stage) from
    the EMA weights of a base checkpoint."""
    per, device = SAMPLES_PER_PROMPT["base64"], torch.device("cpu")
    emb, mask = held_out_text(encoder)
    emb, mask = emb.repeat_interleave(per, 0), mask.repeat_interleave(per, 0)
    generator = torch.Generator().manual_seed(stage_seed(args.seed, STAGES.index("base64")))
    return draw_stage(str(checkpoint), sampler(args, "base64"), emb, mask, device, Precision(32, device), None,
                      generator, SAMPLE_BATCH, stage="base64")[0]


def sr_progress(stage: str, run_dir: Path, exports: dict[str, Path], measured: dict) -> dict:
    """The read-back score of the SR stage's periodic cascade grids (samples/cascade_step_N.png)
    and, at the last step (not evaluated in training: evaluation.at_last_step), that of the final
    samples, drawn with the same weights: `measure`'s figures of them, `measured`."""
    per = EVAL_PER_PROMPT[stage]
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(per)]
    points = {}
    grids = sorted((run_dir / "samples").glob("cascade_step_*.png"), key=lambda p: int(p.stem.split("_")[-1]))
    for path in grids:
        tiles = split_grid(Image.open(path), RESOLUTION[stage], len(prompts), ncols=per if per > 1 else None)
        points[path.stem.split("_")[-1]] = _cascade_point(tiles, prompts)
    last = step_of(find_checkpoint(run_dir / "checkpoints").name)
    size = SIZES[stage]
    final = measured["prompt_following"][size]["all_prompts"]
    points[str(last)] = {**{k: v for k, v in final.items() if k not in ("n", "all_right")},
                         "background_std_max": measured["background_std"]["samples"][size]["max"],
                         "edge_width_px": measured["edges"][size]["samples"]["edge_width_px"],
                         "from": "final samples", "samples_per_prompt": final["n"] // len(HELD_OUT_PROMPTS)}
    earlier = STAGES[:STAGES.index(stage)]
    return {"samples_per_prompt": per, "cascade_from": ", ".join(str(exports[s].name) for s in earlier),
            "grids": f"{run_dir.name}/samples/cascade_step_N.png", "by_step": points}


def _cascade_point(pixels, prompts: list[str]) -> dict:
    return {**prompt_following(pixels, prompts), "background_std_max": max(background_std(t) for t in pixels),
            "edge_width_px": summarize(pixels)["edge_width_px"]}


def fid_over_training(args, encoder: Path, base_dir: Path, holdout: Path) -> dict:
    """FID (64 px) of samples from each kept base checkpoint against the held-out images, with
    the pre-trained FID Inception weights given by --inception."""
    inception = load_fid_inception(args.inception)
    real, captions = read_holdout(holdout, 64)
    real_features = extract_features(inception, real)
    text = load_text_encoder(encoder, "cpu", torch.float32, max_length=32)
    n = min(args.fid_samples, len(captions))
    emb, mask = text.encode(captions[:n], max_length=32, pad_to_max_length=True)
    s = sampler(args, "base64")
    points = {}
    for tag in list_complete(base_dir / "checkpoints"):
        net, cfg = load_stage(str(base_dir / "checkpoints" / tag), True, torch.device("cpu"), torch.float32)
        images = build_diffusion(cfg.diffusion).sample(
            net, (n, 3, 64, 64), emb, mask, s, generator=torch.Generator().manual_seed(args.seed)).images
        fid = fid_from_features(real_features, extract_features(inception, to_uint8(images)))
        points[str(step_of(tag))] = round(fid, 3)
        log(f"FID at step {step_of(tag)}: {points[str(step_of(tag))]}")
    return {"feature_extractor": f"Inception-v3 with the weights of {Path(args.inception).name}",
            "real_images": len(real), "generated_per_point": n, "sampler": describe(s), "by_step": points}


# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/quickstart, runs/quickstart-seedN for --seed N > 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the datasets (data_tools synthetic --seed), seeds every stage's training "
                             "(weights, noise, data order: training.seed and data.seed) and the sampling noise")
    parser.add_argument("--to", type=int, choices=(64, 256, 1024), default=1024,
                        help="the last stage: 64 (base), 256 (64 -> 256) or 1024 (256 -> 1024)")
    parser.add_argument("--short", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--encoder", default=None,
                        help="a real T5 save_pretrained folder instead of the small random one built here")
    parser.add_argument("--samples", type=int, default=6000, help="synthetic training samples at 256 px")
    parser.add_argument("--hires-samples", type=int, default=1000, help="synthetic training samples at 1024 px")
    parser.add_argument("--base-steps", type=int, default=2400, help="optimizer steps of the 64 px stage")
    parser.add_argument("--sr-steps", type=int, default=2400, help="optimizer steps of the 64->256 stage")
    parser.add_argument("--sr1024-steps", type=int, default=1200, help="optimizer steps of the 256->1024 stage")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (CPU processes)")
    parser.add_argument("--inception", default=None,
                        help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth): adds the FID "
                             "of each kept base checkpoint against the held-out images to the report")
    parser.add_argument("--fid-samples", type=int, default=64, help="generated images per FID point")
    args = parser.parse_args(argv)
    if args.short:
        args.samples, args.hires_samples, args.base_steps, args.sr_steps, args.sr1024_steps, args.fid_samples = \
            96, 40, 4, 2, 2, 8
    args.out = Path(args.out or REPO / "runs" / ("quickstart" if args.seed == 0 else f"quickstart-seed{args.seed}"))
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = args.out / "seed.json"
    if drawn.is_file() and json.loads(drawn.read_text())["seed"] != args.seed:
        parser.error(f"{args.out} holds a run of --seed {json.loads(drawn.read_text())['seed']}; "
                     f"give another --out for --seed {args.seed}")
    drawn.write_text(json.dumps({"seed": args.seed}))
    return args


def measure(args, folders: dict[str, Path], drawn: dict, timer: Timer) -> dict:
    """Read-back score, grain and edges of the samples at every size, against the training images."""
    samples = drawn["samples"]
    following = score_prompt_following({SIZES[s]: v["images"] for s, v in samples.items()},
                                       {SIZES[s]: v["prompts"] for s, v in samples.items()})
    for size, score in following.items():
        log(f"{size}: {score['all_prompts']['all_right']}/{score['all_prompts']['n']} all right")
    training = {64: read_holdout(folders["raw256"] / "holdout", 64)[0], 256: read_holdout(folders["raw256"] / "holdout", 256)[0]}
    if "raw1024" in folders:
        training[1024] = read_holdout(folders["raw1024"] / "holdout", 1024)[0]
    grains = {"samples": {}, "samples_without_final_average": {}, "training_images": {}, "goal_max": GRAIN_GOAL,
              "within_goal": {}}
    edge = {}
    with timer("report: grain and edges"):
        for stage, s in samples.items():
            size, px = SIZES[stage], RESOLUTION[stage]
            pixels = to_pixels(s["images"])
            before = to_pixels(s["before_final"]) if s["before_final"] is not None else None
            grains["samples"][size] = grain(pixels, s["prompts"])
            if before is not None:
                grains["samples_without_final_average"][size] = grain(before)
            train_pixels = to_pixels(training[px][:8 if px == 1024 else 16])  # drawn: all alike
            grains["training_images"][size] = grain(train_pixels)
            grains["within_goal"][size] = grains["samples"][size]["max"] <= GRAIN_GOAL
            edge[size] = edges(pixels, before, to_pixels(s["inputs"]) if s["inputs"] is not None else None,
                               train_pixels)
            log(f"{size}: grain {grains['samples'][size]['max']} (largest); edge width {edge[size]['samples']['edge_width_px']} px"
                + (f", bicubic {edge[size]['bicubic']['edge_width_px']} px" if "bicubic" in edge[size] else ""))
    return {"prompt_following": following, "background_std": grains, "edges": edge}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, timer, start, cpu_start = args.out, Timer(), time.time(), cpu_seconds()
    folders = draw_data(args, out, timer)
    exports = train_stages(args, out, folders, timer)
    drawn = sample_cascade(args, out, folders, exports, timer)
    grids, bicubic_grids = write_grids(out, drawn["samples"])
    metrics = measure(args, folders, drawn, timer)
    with timer("report: progress over training"):
        progress = progress_over_training(args, folders["encoder"], out / "base64",
                                          drawn["samples"]["base64"]["images"])
        sr = {s: sr_progress(s, out / s, exports, metrics) for s in ("sr256", "sr1024") if s in exports}
    fid = fid_over_training(args, folders["encoder"], out / "base64", folders["raw256"] / "holdout") \
        if args.inception else None
    minutes = round((time.time() - start) / 60, 2)
    metrics.update({
        "minutes": minutes, "seed": args.seed, "target_px": args.to, "prompts": HELD_OUT_PROMPTS,
        "samplers": drawn["samplers"], "grids": grids, "bicubic_grids": bicubic_grids or "-",
        "progress": progress, "sr_progress": sr, "fid_64px": fid, "timings_s": timer.seconds,
        "cpu_s": timer.cpu_seconds, "cpu_minutes": round((cpu_seconds() - cpu_start) / 60, 2),
        "per_stage_s": per_stage_seconds(timer, drawn["stats"]),
        "sampling_s": {s.stage: round(s.time_s, 1) for s in drawn["stats"]},
        "exports": {k: str(v) for k, v in exports.items()},
        "train_loss_last": {s: last_loss(out / s) for s in exports}})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, metrics)
    log(f"done in {minutes} min: report {out / 'report.md'}, grids {out / 'samples'}, "
        f"W&B offline runs under {', '.join(str(out / s / 'wandb') for s in exports)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
