"""The quickstart, shortened (`--short`: a few steps of every stage), end to end on 2 CPU ranks."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from train_helpers import REPO, train_env

pytestmark = pytest.mark.timeout(900)


def test_quickstart_short_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "quickstart"
    cmd = [sys.executable, str(REPO / "launch" / "quickstart.py"), "--short", "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_64px"]["by_checkpoint"], metrics
    assert "RANDOM weights" in metrics["fid_64px"]["feature_extractor"]  # named honestly
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
    report = (out / "report.md").read_text()
    assert "random T5" in report and "grid-256.png" in report and "| 256px | **all prompts** |" in report

    shard = out / "data" / "raw" / "00000.tar"
    stamp = shard.stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert shard.stat().st_mtime_ns == stamp  # the data was not drawn again
    assert "resumed from" in again.stdout + again.stderr  # training picked up its checkpoints


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
