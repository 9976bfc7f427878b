"""bench/gpu_check.sh's CPU rehearsal: the same steps as on a GPU, with tiny presets, in fp32.

The GPU time it is written for is short and rare: this proves, on every CI run, that each step's
command works and that its figures reach the summary.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile

import pytest

from train_helpers import REPO, train_env

pytestmark = pytest.mark.timeout(900)

MUST_PASS = ["env", "data", "smoke-default", "step-base64", "step-sr256", "trainer-base64", "trainer-sr256",
             "sampling", "smoke-zero1-fp32", "smoke-zero3-fp32", "smoke-resume", "lever-attention", "lever-norm"]


def test_rehearsal_runs_every_step_and_summarises_it(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", "--out", str(out), "--budget", "800"],
                          cwd=REPO, env=train_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {row[0]: row[1:] for row in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}
    failed = {name: steps.get(name) for name in MUST_PASS if steps.get(name, ["missing"])[0] != "ok"}
    logs = {name: (out / "logs" / f"{name}.log").read_text()[-1500:] for name in failed
            if (out / "logs" / f"{name}.log").is_file()}
    assert not failed, f"{failed}\n{logs}"
    assert steps["lever-compile"][0] == "skipped"  # minutes of inductor on a CPU; the GPU run does it
    assert steps["peer-base64"][0] in ("ok", "skipped")  # skipped only where diffusers is missing

    summary = (out / "summary.md").read_text()
    assert "device cpu" in summary
    # A figure is missing only where its step was skipped, and then the summary says why.
    missing = [line for line in summary.splitlines() if "not measured" in line]
    assert missing and all("(skipped: " in line for line in missing), missing
    assert "| 32 | 1 | ok | base64 | float32 |" in summary  # the sampling run's per-stage row
    mfu_rows = [line for line in summary.splitlines() if line.startswith("| step-base64 | ours |")]
    assert len(mfu_rows) == 1 and "%" in mfu_rows[0]
    ratio_rows = [line for line in summary.splitlines() if line.startswith("| trainer-sr256 | configs/")]
    assert len(ratio_rows) == 1 and float(ratio_rows[0].rstrip(" |").split("|")[-1]) > 0
    # Each smoke run trained and checkpointed; the resume continued from the checkpoint.
    smoke = summary.split("## Trainer smoke")[1].split("## Sampling")[0]
    rows = {line.split("|")[1].strip(): line for line in smoke.splitlines() if line.startswith("| smoke-")}
    for run in ("smoke-zero1-fp32", "smoke-zero2-fp32", "smoke-zero3-fp32"):
        assert "step_00000004" in rows[run], rows[run]
    assert "resume: [train] resumed from" in summary and "at step 4" in summary
    assert "step_00000007" in rows["smoke-zero2-fp32"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "json/step-base64.json" in names and "json/trainer-base64.json" in names and "steps.tsv" in names
