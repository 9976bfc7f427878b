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
