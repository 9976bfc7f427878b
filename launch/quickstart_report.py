"""What the CPU quickstart measures on its samples, and the report it writes (launch/quickstart.py).

Everything is read back from the pixels: the shape's colour, kind, place and background
(`data_tools.synthetic.read_shape`), the grain on the background (`background_std`), and the
sharpness and raggedness of the shape's edge (`data_tools.shape_edges`), the latter for each
super-resolution stage beside bicubic upsampling of the stage's own input and beside the training
images at that size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from data_tools.shape_edges import SHARPER_THAN_BICUBIC, compare_with_bicubic, summarize
from data_tools.synthetic import background_std, prompt_following
from imagen_train.data import SampleSpec, iter_samples
from imagen_train.evaluation.fid import to_uint8

SIZES = {"base64": "64px", "sr256": "256px", "sr1024": "1024px"}
GRAIN_GOAL = 3.0  # the largest background std (0-255) a size's samples may keep (issue 29's goal)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) float in [-1, 1] (or uint8) -> (N, H, W, 3) uint8."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def bicubic(pixels: np.ndarray, size: int) -> np.ndarray:
    """Plain upsampling: each (H, W, 3) uint8 image resized to size x size with PIL's bicubic filter."""
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pixels])


def read_holdout(holdout: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """The held-out images of a shard folder (uint8, (N, 3, size, size), bicubic to `size` where
    they are another size) and their captions."""
    samples = list(iter_samples(sorted(str(p) for p in holdout.glob("*.tar")), SampleSpec.images(size)))
    return torch.stack([s.image for s in samples]), [s.caption for s in samples]


def split_grid(grid: Image.Image, size: int, n: int, ncols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """The n images (n, size, size, 3) uint8 of a grid `evaluation.grids.make_grid` wrote."""
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    pixels = np.asarray(grid.convert("RGB"))
    tiles = []
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        tiles.append(pixels[y:y + size, x:x + size])
    return np.stack(tiles)


def grain(pixels: np.ndarray, prompts: Optional[list[str]] = None) -> dict[str, Any]:
    """`background_std` (0-255) of images (N, H, W, 3) uint8: largest, median, and per prompt the largest."""
    stds = [background_std(p) for p in pixels]
    out: dict[str, Any] = {"max": max(stds), "median": sorted(stds)[len(stds) // 2]}
    if prompts is not None:
        out["by_prompt"] = {p: max(v for v, q in zip(stds, prompts) if q == p) for p in dict.fromkeys(prompts)}
    return out


def score_prompt_following(images_by_size: dict[str, Any], prompts_by_size: dict[str, list[str]] | list[str]
                           ) -> dict:
    """Per size: the fractions of samples whose colour, kind, position and background, read back
    from their pixels (`data_tools.synthetic.read_shape`), match their prompt; overall, per prompt,
    and the counts (`n`, `all_right`)."""
    scores = {}
    for size, images in images_by_size.items():
        prompts = prompts_by_size if isinstance(prompts_by_size, list) else prompts_by_size[size]
        pixels = images if isinstance(images, np.ndarray) else to_pixels(images)
        by_prompt = {}
        for prompt in dict.fromkeys(prompts):
            rows = [i for i, q in enumerate(prompts) if q == prompt]
            by_prompt[prompt] = {**prompt_following(pixels[rows], [prompt] * len(rows)), "n": len(rows)}
        overall = prompt_following(pixels, prompts)
        scores[size] = {"all_prompts": {**overall, "n": len(prompts), "all_right": round(overall["all"] * len(prompts))},
                        "by_prompt": by_prompt}
    return scores


def edges(outputs: np.ndarray, before_final: Optional[np.ndarray], inputs: Optional[np.ndarray],
          training: np.ndarray) -> dict[str, Any]:
    """Edge width and raggedness (`data_tools.shape_edges`) of one size's samples (with and without
    the final denoising average), of bicubic upsampling of the stage's inputs (SR stages), and of
    the training images; with the sharpness check of the stage against bicubic."""
    def brief(pixels: np.ndarray) -> dict[str, Any]:
        summary = summarize(pixels)
        return {k: v for k, v in summary.items() if k != "per_image"} | {
            "per_image_edge_width_px": [m["edge_width_px"] for m in summary["per_image"]]}

    out: dict[str, Any] = {"samples": brief(outputs), "training_images": brief(training)}
    if before_final is not None:
        out["samples_without_final_average"] = brief(before_final)
    if inputs is not None:
        out["bicubic"] = brief(bicubic(inputs, outputs.shape[1]))
        out["check"] = compare_with_bicubic(out["samples"], out["bicubic"])
        if before_final is not None:
            out["check_without_final_average"] = compare_with_bicubic(out["samples_without_final_average"],
                                                                      out["bicubic"])
    return out


# ----------------------------------------------------------------------------------------------
# The report.

def _following_rows(metrics: dict) -> str:
    grains = metrics["background_std"]["samples"]
    rows = []
    for size, by_size in metrics["prompt_following"].items():
        for prompt, s in [*by_size["by_prompt"].items(), ("**all prompts**", by_size["all_prompts"])]:
            g = grains[size]["by_prompt"].get(prompt, grains[size]["max"])
            rows.append(f"| {size} | {prompt} | {s['n']} | "
                        + " | ".join(str(s[k]) for k in ("colour", "shape", "position", "background", "all"))
                        + f" | {g} |")
    return "\n".join(rows)


def _grain_rows(metrics: dict) -> str:
    grains = metrics["background_std"]
    rows = []
    for size, g in grains["samples"].items():
        without = grains["samples_without_final_average"].get(size)
        within = g["max"] <= grains.get("goal_max", GRAIN_GOAL)
        rows.append(f"| {size} | {g['median']} / {g['max']} | "
                    + (f"{without['median']} / {without['max']}" if without else "-")
                    + f" | {grains['training_images'][size]['max']} | "
                    + ("yes" if within else "**NO**") + " |")
    return "\n".join(rows)


def _edge_rows(metrics: dict) -> str:
    rows = []
    for size, e in metrics["edges"].items():
        def cell(key: str) -> str:
            return f"{e[key]['edge_width_px']} / {e[key]['raggedness_px']}" if key in e else "-"
        check = e.get("check")
        verdict = (f"{check['edge_width_ratio']} ({'sharper' if check['sharper_than_bicubic'] else 'NOT sharper'})"
                   if check else "-")
        rows.append(f"| {size} | {cell('samples')} | {cell('samples_without_final_average')} | {cell('bicubic')} "
                    f"| {cell('training_images')} | {verdict} |")
    return "\n".join(rows)


def _progress_part(metrics: dict) -> str:
    progress = metrics["progress"]
    rows = "\n".join(f"| {step}{_final_note(p)} | {p['colour']} | {p['shape']} | {p['position']} | {p['all']} | "
                     f"{p['background_std_max']} |" for step, p in progress["by_step"].items())
    text = f"""## Progress over training: the held-out prompts at every kept 64 px checkpoint
{progress['samples_per_prompt']} samples per prompt, {progress['sampler']}, the final samples' noise
at every checkpoint; the last checkpoint is the exported stage, so its row reads the final
samples. Fractions read back as above, grain the largest background std.

| step | colour | kind | position | all | grain |
|---|---|---|---|---|---|
{rows}
"""
    for stage, sr in metrics.get("sr_progress", {}).items():
        sr_rows = "\n".join(f"| {step}{_final_note(p)} | {p['colour']} | {p['shape']} | {p['position']} | {p['all']} | "
                            f"{p['background_std_max']} | {p['edge_width_px']} |" for step, p in sr["by_step"].items())
        text += f"""
### The cascade at every kept checkpoint of the {stage} stage (its periodic evaluation)
The evaluation draws the held-out prompts with the earlier stages' exports ({sr['cascade_from']}),
once, and lifts them with the stage's EMA weights at each evaluation
(`evaluation.cascade_from`); {sr['samples_per_prompt']} per prompt. Grids: `{sr['grids']}`. The last
step is not evaluated in training (`evaluation.at_last_step: false`): its row reads the final
samples above, drawn with the same weights.

| step | colour | kind | position | all | grain | edge width (px) |
|---|---|---|---|---|---|---|
{sr_rows}
"""
    return text


def _final_note(point: dict) -> str:
    return f" (final samples, {point['samples_per_prompt']} per prompt)" if point.get("from") == "final samples" else ""


def _fid_part(metrics: dict) -> str:
    fid = metrics["fid_64px"]
    if not fid:
        return ("No FID: it needs the pre-trained FID Inception weights (`--inception`), which are not\n"
                "downloaded here; with random weights its value did not follow training (docs/training.md).\n")
    rows = "\n".join(f"| {step} | {value} |" for step, value in fid["by_step"].items())
    return f"""## FID of the 64 px stage against {fid['real_images']} held-out images, over training
Feature extractor: {fid['feature_extractor']}.
{fid['generated_per_point']} generated images per point, {fid['sampler']}.

| step | FID |
|---|---|
{rows}
"""


def _timing_rows(metrics: dict) -> str:
    cpu = metrics.get("cpu_s", {})
    return "\n".join(f"| {phase} | {seconds} | {cpu.get(phase, '-')} |" for phase, seconds in metrics["timings_s"].items())


def _stage_time_rows(metrics: dict) -> str:
    return "\n".join(f"| {stage} | {t['data']} | {t['train']} | {t['sample']} |"
                     for stage, t in metrics.get("per_stage_s", {}).items())


def write_report(out: Path, metrics: dict) -> None:
    """report.md in `out` from the quickstart's metrics (see launch/quickstart.py)."""
    prompts = "\n".join(f"{i}. {p}" for i, p in enumerate(metrics["prompts"]))
    grids = "\n\n".join(f"{g['title']}: ![{g['title']}]({g['path']})" for g in metrics["grids"])
    samplers = "; ".join(f"{stage} {text}" for stage, text in metrics["samplers"].items())
    following_rows, grain_rows, edge_rows = _following_rows(metrics), _grain_rows(metrics), _edge_rows(metrics)
    progress, fid, timing_rows = _progress_part(metrics), _fid_part(metrics), _timing_rows(metrics)
    stage_rows = _stage_time_rows(metrics)
    (out / "report.md").write_text(f"""# Quickstart report

Finished in {metrics['minutes']} minutes ({metrics.get('cpu_minutes', '-')} CPU minutes, this process and its
children) (seed {metrics['seed']}), through {metrics['target_px']} px. The text encoder is a small random T5
(not pre-trained).

## Samples for prompts no training caption holds word for word (one row per prompt)
{prompts}

{grids}

Samplers (EMA weights): {samplers}.

Per-prompt grids and PNGs: `samples/grids/`, `samples/images/`; settings and timings: `samples/settings.json`.

## Do the samples follow their prompts?
Each sample's shape is read back from its pixels (`data_tools.synthetic.read_shape`: background
from the border, the shape's colour, its kind from how it fills its bounding box, its position
from the box's centre); the table gives the fraction of samples whose attribute matches the
prompt ("all": colour, kind and position at once; "n": samples). Chance is 1/4 for colour, 1/3 for
kind, 1/5 for position. "grain" is the largest background std of the prompt's samples
(`data_tools.synthetic.background_std`, 0-255: the standard deviation of the pixels away from
the shape).

| size | prompt | n | colour | kind | position | background | all | grain |
|---|---|---|---|---|---|---|---|---|
{following_rows}

## Grain, with and without the final denoising average
Background std (0-255), median / largest over the samples. "Without" is each stage's sampler
output before its own final average (its input the previous stage's averaged output).

| size | with | without | training images (largest) | largest with <= {GRAIN_GOAL} |
|---|---|---|---|---|
{grain_rows}

## Edges: each super-resolution stage against bicubic upsampling of its own input
Edge width: px from 10 % to 90 % of the way from the background to the shape, across its boundary;
raggedness: RMS px of the boundary from its convex hull (`data_tools.shape_edges`); medians over
the images, width / raggedness. A stage passes when its edge width is at most
{SHARPER_THAN_BICUBIC} x bicubic's (ratio = stage / bicubic). Bicubic baselines beside the stage's
output: {metrics['bicubic_grids']}.

| size | samples | without final average | bicubic of the stage's input | training images | width ratio to bicubic |
|---|---|---|---|---|---|
{edge_rows}

{progress}
{fid}
## Time (seconds, this invocation)
Per stage, wall seconds: data (the encoder and the 256 px set, which the 64 px stage reads
downscaled and the 64 -> 256 stage reads whole, are counted under base64), train (with its periodic
evaluation and export), sample (its share of the cascade's sampling). A re-run counts only what it did.

| stage | data | train | sample |
|---|---|---|---|
{stage_rows}

Per phase, wall and CPU seconds (user + system, this process and its children: on a shared
machine the wall time stretches, the CPU time much less).

| phase | wall s | CPU s |
|---|---|---|
{timing_rows}

Last logged training loss: {metrics['train_loss_last']}.
Exported EMA weights: {metrics['exports']}.
""")
