"""docs/guide.md, run as written: every tagged command block, in order, from a fresh copy of the
repository, on a CPU at tiny size, to a FID number (the guide's "How to read the code blocks"
says what each tag means and what this test does with it)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imagen_train.config import load_config
from train_helpers import REPO, free_port

GUIDE = REPO / "docs" / "guide.md"
RUN_TAGS = ("settings-rehearsal", "rehearsal", "run")  # what the rehearsal runs, in order
TAGS = RUN_TAGS + ("settings-cluster", "cluster")


@dataclass
class Block:
    tag: str
    code: str
    line: int  # of the opening fence, 1-based


def guide_blocks(text: str) -> list[Block]:
    """Every fenced bash block of the guide with its tag ("" when it has none)."""
    blocks = []
    for match in re.finditer(r"^```bash([^\n]*)\n(.*?)^```", text, re.M | re.S):
        blocks.append(Block(match.group(1).strip(), match.group(2), text[:match.start()].count("\n") + 1))
    return blocks


def settings_names(code: str) -> set[str]:
    return set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", code, re.M))


def test_every_bash_block_is_tagged_and_both_settings_set_the_same_names():
    blocks = guide_blocks(GUIDE.read_text())
    assert [b for b in blocks if b.tag not in TAGS] == [], "a bash block without a known tag"
    cluster = [b for b in blocks if b.tag == "settings-cluster"]
    rehearsal = [b for b in blocks if b.tag == "settings-rehearsal"]
    assert len(cluster) == 1 and len(rehearsal) == 1
    assert settings_names(cluster[0].code) == settings_names(rehearsal[0].code)
    # Commands read the settings, never a path of their own: no /data or /models outside them.
    for b in blocks:
        if not b.tag.startswith("settings"):
            assert not re.search(r"(?<![\w$])/(data|models)/", b.code), f"guide.md:{b.line} names a path"


def _expanded(settings: str, command: str) -> list[str]:
    """`command`'s words after bash expands them with `settings` (nothing is run)."""
    script = f"{settings}\nset -- {command}\nprintf '%s\\0' \"$@\""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def _commands(code: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_cluster_commands_name_configs_and_settings_that_load():
    """The commands the rehearsal cannot run (many nodes, SLURM, W&B online) at least name
    existing scripts and configs, with --set keys that exist: a rename breaks this test."""
    blocks = guide_blocks(GUIDE.read_text())
    settings = next(b.code for b in blocks if b.tag == "settings-cluster")
    checked = 0
    for block in (b for b in blocks if b.tag == "cluster"):
        for command in _commands(block.code):
            words = _expanded(settings, re.sub(r"^([A-Z_]+=\S*\s+)+", "", command))  # env assignments off
            scripts = [w for w in words if w.endswith((".py", ".sbatch", ".example"))]
            assert all((REPO / w).is_file() for w in scripts), f"guide.md:{block.line}: {scripts}"
            config = next((words[i + 1] for i, w in enumerate(words) if w == "--config" or w.endswith(".sbatch")),
                          None)
            if config is None:
                continue
            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            assert load_config(REPO / config, sets).stage in ("base64", "sr256", "sr1024")
            checked += 1
    assert checked >= 5


def _fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone would have them (tracked and new, nothing ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_guide_runs_from_a_fresh_copy_to_a_fid_number(tmp_path):
    blocks = [b for b in guide_blocks(GUIDE.read_text()) if b.tag in RUN_TAGS]
    clone, work = _fresh_copy(tmp_path / "clone"), tmp_path / "work"
    # One bash session, as a reader pasting the blocks would have; each block announces itself
    # so that a failure names the guide's line.
    script = "set -euo pipefail\n" + "".join(
        f"echo '### guide.md:{b.line} ({b.tag})'\n{b.code}\n" for b in blocks)
    env = {**os.environ, "WORK": str(work), "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the copy's own code, as in a fresh clone
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=840)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = re.findall(r"### (guide\.md:\d+ \(\w[\w-]*\))", proc.stdout)
        raise AssertionError(f"the guide failed in the block at {last[-1] if last else '?'} "
                             f"(exit {proc.returncode})\n{log[-6000:]}")

    # Step 2-3: every input shard embedded, with its record; the second precompute skipped them all.
    inputs = sorted((work / "shards").glob("*.tar"))
    assert len(inputs) == 4 and all((work / "emb" / f"{p.name}.json").is_file() for p in inputs)
    record = json.loads((work / "emb" / "00000.tar.json").read_text())
    assert record["input_samples"] == 8 and record["output_samples"] == 8
    # Step 4: the printed config is the run's, and each run wrote both configs into runs/<preset>.
    printed = list(yaml.safe_load_all((work / "base64-config.yaml").read_text()))
    assert printed[0]["run_dir"] == "runs/base64-tiny" and printed[1]["train_batch_size"] == 4
    for run in ("base64-tiny", "sr256-tiny"):
        folder = clone / "runs" / run
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "latest").is_file()
        assert json.loads((folder / "deepspeed_config.json").read_text())["gradient_accumulation_steps"] == 1
    # Step 6: two prompts, one 256 px image each.
    assert Image.open(work / "samples" / "images" / "p001_i00.png").size == (256, 256)
    # Step 7: statistics at 256 px of the drawn COCO images; one row per guidance scale, one
    # image per caption at 256 px, a finite FID and CLIP score.
    rows = list(csv.DictReader(open(work / "eval" / "sweep.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 3.0]
    assert all(int(r["num_images"]) == 6 for r in rows)
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert all(-1 <= float(r["clip_score"]) <= 1 for r in rows)
    settings = json.loads((work / "eval" / "sweep.json").read_text())["settings"]
    assert settings["target_resolution"] == 256 and settings["num_images_per_prompt"] == 1
    assert "| guidance | FID | CLIP score |" in proc.stdout  # `cat sweep.md` at the end
    assert "Traceback" not in log
