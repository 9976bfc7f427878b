"""bench/gpu_check.sh: its CPU rehearsal (the same steps as on a GPU, tiny presets, fp32), what it
leaves in --out (what a device machine returns: at most 8 files of 16 MiB), a run killed halfway,
a machine without DeepSpeed, and a summary of half-written results.

The GPU time it is written for is short and rare: this proves, on every CI run, that each step's
command works and that its figures reach the summary, whatever happens to the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from train_helpers import REPO, train_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_summary  # noqa: E402

pytestmark = pytest.mark.timeout(1500)

MUST_PASS = ["env", "data", "smoke-default", "smoke-resume", "smoke-zero3-fp32", "step-base64", "step-sr256",
             "trainer-base64", "levers-norm", "levers-kernels", "norm-region", "lever-compile", "sampling", "sampling-table"]
RETURN_FILES, RETURN_BYTES = 8, 16 * 2**20  # what the device machine brings back from $OUT
BASELINES = {"levers-norm": ["groupnorm-fp32-copy", "fused-norm-everywhere"],
             "levers-kernels": ["no-cudnn-benchmark", "unmasked-attention", "set:training.channels_last=true"]}


def _run_check(out: Path, work: Path, *extra: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["bash", "bench/gpu_check.sh", "--out", str(out), "--work", str(work), *extra],
                            cwd=REPO, env=env or train_env(PYTHON=sys.executable), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _returned(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= RETURN_FILES and all(p.stat().st_size <= RETURN_BYTES for p in files), \
        [(p.name, p.stat().st_size) for p in files]
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    return files


def _kill_leftovers(work: Path) -> None:
    """`timeout` puts each step in a process group of its own, which a kill of the check's group
    does not reach (a device machine ends them when the call returns): end them here."""
    for p in psutil.process_iter(["cmdline"]):
        if any(str(work) in arg for arg in p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.Error:  # gone already
                pass


@pytest.mark.bench
def test_rehearsal_runs_every_step_and_returns_only_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run_check(out, work, "--rehearse", "--budget", "1200")
    log, _ = proc.communicate(timeout=1400)
    assert proc.returncode == 0, log[-4000:]
    assert sorted(p.name for p in _returned(out)) == ["gpu-check.tar.gz", "steps.tsv", "summary.md"]
    steps = {row[0]: row[1:] for row in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}
    failed = {name: steps.get(name) for name in MUST_PASS if steps.get(name, ["missing"])[0] != "ok"}
    logs = {name: (work / "logs" / f"{name}.log").read_text()[-1500:] for name in failed
            if (work / "logs" / f"{name}.log").is_file()}
    assert not failed, f"{failed}\n{logs}"
    assert steps["peer-base64"][0] in ("ok", "skipped")  # skipped only where diffusers is missing

    summary = (out / "summary.md").read_text()
    assert "device cpu" in summary
    # A figure is missing only where its step was skipped, and then the summary says why.
    missing = [line for line in summary.splitlines() if "not measured" in line]
    assert missing and all("(skipped: " in line for line in missing), missing
    mfu_rows = [line for line in summary.splitlines() if line.startswith("| step-base64 | ours |")]
    assert len(mfu_rows) == 1 and "%" in mfu_rows[0]
    ratio = [line for line in summary.splitlines() if line.startswith("| trainer-base64 | configs/")]
    assert len(ratio) == 1 and float(ratio[0].rstrip(" |").split("|")[-1]) > 0
    # Every lever has its before / after row, and compile its counts from dynamo.
    for run, names in BASELINES.items():
        for name in names:
            assert f"| {run} | {name} |" in summary, name
    assert "| lever-compile | eager |" in summary
    assert "'recompile_limit_hits': 0" in summary and "'graph_breaks': 0" in summary
    assert "GroupNorm in place" in summary and "err " in summary
    # Each smoke run trained and checkpointed; the resume continued from the checkpoint.
    smoke = summary.split("## Trainer smoke")[1].split("## Sampling")[0]
    rows = {line.split("|")[1].strip(): line for line in smoke.splitlines() if line.startswith("| smoke-")}
    assert "step_00000004" in rows["smoke-zero3-fp32"] and "step_00000007" in rows["smoke-zero2-fp32"]
    assert "resume: [train] resumed from" in summary and "at step 4" in summary
    assert "| 32 | 1 | float32 |" in summary  # the sampling run's base-stage row
    # The table step reused the sampling step's export instead of writing it again.
    exports = sorted(p.name for p in (work / "sampling").glob("*.safetensors"))
    assert exports == ["base64-tiny-bf16.safetensors"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert {"./json/step-base64.json", "./json/trainer-base64.json", "./steps.tsv", "./logs/smoke-default.log",
            "./runs/smoke-zero2-fp32.metrics.jsonl"} <= set(names)


@pytest.mark.bench
def test_a_run_killed_halfway_leaves_a_readable_summary(tmp_path):
    """Killed as a device call's time limit kills it (SIGKILL to every process), during a step:
    --out still holds the summary and tarball of the steps before, within the return limits."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run_check(out, work, "--rehearse", "--budget", "600")
    steps = out / "steps.tsv"
    deadline = time.monotonic() + 300
    while not (steps.is_file() and "env\tok" in steps.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the env step did not finish"
        time.sleep(0.2)
    time.sleep(1.0)  # into the data step
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _kill_leftovers(work)
    _returned(out)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (rehearse)") and "| env | ok |" in summary
    assert "data\t" not in steps.read_text()  # killed during it: no row, and nothing half-written
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        assert json.loads(tar.extractfile("./json/env.json").read())["device"] == "cpu"


def test_a_machine_without_deepspeed_or_gpu_site_stops_at_once(tmp_path):
    if (REPO / ".gpu_site").exists():
        pytest.skip("this checkout carries a .gpu_site/")
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named deepspeed')\n")
    env = train_env(PYTHON=sys.executable)
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = _run_check(tmp_path / "out", tmp_path / "work", env=env)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, log
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "stopped at once" in summary and "no .gpu_site/ was carried" in summary and "gpu_site.sh" in summary
    assert (tmp_path / "out" / "steps.tsv").read_text() == ""  # no step ran


def test_the_summary_reads_half_written_results(tmp_path):
    """The summary is rewritten after every step, so it meets results cut short: a partial
    train_step JSON (networks compiled, timed rounds not finished), a truncated JSON file, and
    steps that never ran. Each figure says which; none is made up, and no section takes the
    others down."""
    (tmp_path / "json").mkdir()
    (tmp_path / "steps.tsv").write_text("env\tok\t3\trc=0\nlever-compile\ttimeout\t200\trc=124 limit=200s\n")
    (tmp_path / "json" / "lever-compile.json").write_text(json.dumps(
        {"partial": True, "config": "configs/base64-500m.yaml", "batch": 128, "precision": "bf16", "device": "GPU",
         "prepared": [{"name": "ours", "params": 1, "flops_per_sample": 1.0, "first_step_s": 151.2,
                       "compile_mode": "regional", "compile": {"unique_graphs": 42}},
                      {"name": "ours, eager (no torch.compile)", "params": 1, "flops_per_sample": 1.0,
                       "first_step_s": 1.1, "compile_mode": None, "compile": {}}]}))
    (tmp_path / "json" / "levers-norm.json").write_text('{"models": [{"name": "ours"')  # cut mid-write
    (tmp_path / "json" / "trainer-base64.json").write_text(json.dumps({"config": "c"}))  # keys missing
    text = gpu_summary.summary(tmp_path, "gpu", 540)
    assert "first step 151.2 s" in text and "timed rounds not finished" in text
    assert "| levers-norm | not measured (not run yet)" in text
    assert "| step-base64 | not measured (not run yet)" in text
    assert "could not read this section: KeyError" in text  # the trainer section; the rest still printed
    assert "## Sampling" in text and "## Inference memory table" in text
