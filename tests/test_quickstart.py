"""The quickstart, shortened (`--short`: a few steps of every stage), end to end on 2 CPU ranks."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from train_helpers import REPO, train_env

pytestmark = pytest.mark.timeout(900)


@pytest.mark.slow
def test_quickstart_short_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "quickstart"
    cmd = [sys.executable, str(REPO / "launch" / "quickstart.py"), "--short", "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 0 and json.loads((out / "seed.json").read_text()) == {"seed": 0}
    for name in ("grid-64.png", "grid-256.png"):
        assert Image.open(out / "samples" / name).size[0] > 0
    assert Image.open(out / "samples" / "images" / "p000_i00.png").size == (256, 256)
    assert (out / "base64-ema.safetensors").is_file() and (out / "sr256-ema.safetensors").is_file()
    assert list((out / "base64" / "wandb").glob("offline-run-*")), "no offline W&B run"
    following = metrics["prompt_following"]
    for size in ("64px", "256px"):
        overall = following[size]["all_prompts"]
        assert set(overall) == {"colour", "shape", "position", "background", "all"}
        assert all(0.0 <= v <= 1.0 for v in overall.values())
        assert list(following[size]["by_prompt"]) == metrics["prompts"]
    # The progress score: one point per kept base checkpoint (--short: 4 steps, one kept each step).
    progress = metrics["progress"]
    assert list(progress["by_step"]) == ["1", "2", "3", "4"], progress
    for point in progress["by_step"].values():
        assert set(point) == {"colour", "shape", "position", "background", "all", "background_std_max"}
    # Grain: the drawn training images are flat; 4-step models leave their samples noisy.
    grain = metrics["background_std"]
    assert grain["training_images"]["64px"]["max"] == 0.0 and grain["training_images"]["256px"]["max"] == 0.0
    for size in ("64px", "256px"):
        assert grain["samples"][size]["max"] > 10, grain
        assert list(grain["samples"][size]["by_prompt"]) == metrics["prompts"]
    assert metrics["fid_64px"] is None  # no pre-trained Inception weights given
    report = (out / "report.md").read_text()
    assert "random T5" in report and "grid-256.png" in report and "| 256px | **all prompts** |" in report
    assert "Progress over training" in report and "\n| 4 | " in report and "No FID" in report
    # Both stages end on the mean of their conditional prediction over noise draws at sigma 0.5
    # (--short: 2 draws), the progress points too, and the report says so.
    settings = json.loads((out / "samples" / "settings.json").read_text())["settings"]["samplers"]
    for stage in ("base64", "sr256"):
        assert (settings[stage]["final_denoise_sigma"], settings[stage]["final_denoise_draws"]) == (0.5, 2)
        assert metrics["samplers"][stage].endswith("then the mean of 2 conditional predictions at sigma 0.5")
        assert metrics["samplers"][stage] in report
    assert progress["sampler"].startswith(metrics["samplers"]["base64"])

    shard = out / "data" / "raw" / "00000.tar"
    stamp = shard.stat().st_mtime_ns
    logged = (out / "base64" / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert shard.stat().st_mtime_ns == stamp  # the data was not drawn again
    assert "resumed from" in again.stdout + again.stderr  # training picked up its checkpoints
    assert (out / "base64" / "metrics.jsonl").read_text() == logged  # and trained no step again

    other_seed = subprocess.run([*cmd, "--seed", "1"], cwd=REPO, env=train_env(), capture_output=True, text=True,
                                timeout=120)
    assert other_seed.returncode != 0 and "holds a run of --seed 0" in other_seed.stderr


def test_background_std_sees_noise_on_the_background_only():
    """`background_std`: 0 on drawn images, the noise's std when the background is noisy, and
    blind to noise on the shape and to a blurred edge."""
    import numpy as np
    from PIL import ImageFilter

    from data_tools.synthetic import background_std, draw_sample, read_shape

    rng = np.random.default_rng(0)
    for resolution in (64, 256):
        for index in range(12):
            image, _, _ = draw_sample(3, index, resolution, ("large",))
            pixels = np.asarray(image)
            assert background_std(pixels) == 0.0
            noisy = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).round().astype(np.uint8)
            assert 2.6 < background_std(noisy) < 3.4
            shape = np.linalg.norm(pixels.astype(float) - pixels[0, 0], axis=2) > 100
            on_shape = pixels.astype(float) + rng.normal(0, 20, pixels.shape) * shape[..., None]
            assert background_std(np.clip(on_shape, 0, 255).round().astype(np.uint8)) == 0.0
            blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(resolution / 64)))
            assert background_std(blurred) < 0.5 and read_shape(blurred)["shape"] == read_shape(pixels)["shape"]


def test_prompt_following_scores_drawn_images_as_right_and_swapped_prompts_as_wrong():
    """The quickstart's scoring, fed the dataset's own images in the network's [-1, 1] range."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "launch"))
    from quickstart import score_prompt_following

    from data_tools.synthetic import draw_sample

    drawn = [draw_sample(0, i, 64, ("large",)) for i in range(24)]
    images = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
                          for img, _, _ in drawn])
    captions = [caption for _, caption, _ in drawn]
    right = score_prompt_following({"64px": images}, captions)["64px"]
    assert right["all_prompts"] == {"colour": 1.0, "shape": 1.0, "position": 1.0, "background": 1.0, "all": 1.0}
    assert set(right["by_prompt"]) == set(captions)
    shifted = captions[1:] + captions[:1]  # every image judged against another sample's caption
    wrong = score_prompt_following({"64px": images}, shifted)["64px"]["all_prompts"]
    assert wrong["all"] < 0.5
