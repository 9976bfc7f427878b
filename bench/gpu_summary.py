"""The summary of one bench/gpu_check.sh run: every figure in one Markdown file.

    python bench/gpu_summary.py OUT_DIR [--mode gpu|rehearse] > OUT_DIR/summary.md

Reads what the check's steps left in OUT_DIR: steps.tsv (status and seconds of each step),
json/*.json (bench/train_step.py, bench/trainer_overhead.py, bench/sampling.py, env) and
runs/*/metrics.jsonl (the trainer smoke runs). A figure whose step did not finish reads
"not measured": this file never fills a gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

MFU_GOAL = 0.45
TRAINER_GOAL = 0.95


def _json(folder: Path, name: str) -> Optional[dict[str, Any]]:
    path = folder / "json" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _steps(folder: Path) -> list[list[str]]:
    path = folder / "steps.tsv"
    return [line.split("\t") for line in path.read_text().splitlines() if line] if path.is_file() else []


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _skip_note(folder: Path, name: str) -> str:
    """' (skipped: why)' or ' (failed: rc=...)' from steps.tsv, for a figure that is missing."""
    for row in _steps(folder):
        if row[0] == name and row[1] != "ok":
            return f" ({row[1]}: {row[3] if len(row) > 3 else ''})"
    return ""


def step_rows(folder: Path, names: list[str]) -> list[list[Any]]:
    """Bare-step figures of bench/train_step.py results (ours, and the peer or baseline beside it)."""
    rows = []
    for name in names:
        result = _json(folder, name)
        if result is None:
            rows.append([name, "not measured" + _skip_note(folder, name)] + [""] * 8)
            continue
        for m in result["models"]:
            goal = f" (goal {MFU_GOAL:.0%})" if m["name"] == "ours" else ""
            rows.append([name, m["name"], result["batch"], result["precision"], f"{m['step_s_median'] * 1e3:.1f}",
                         f"{m['samples_per_s']:.1f}", f"{m['flops_per_sample'] / 1e9:.1f}",
                         f"{m['achieved_tflops']:.2f}", f"{m['mfu']:.1%}{goal}", f"{m['peak_mem_gib']:.2f}"])
        for key, label in (("ratio", "ours / peer samples/s"), ("speedup", "ours / baseline samples/s")):
            if key in result:
                rows.append([name, label, "", "", "", f"{result[key]['samples_per_s']:.3f}x", "", "", "",
                             f"{result[key]['peak_mem']:.2f}x"])
    return rows


def smoke_rows(folder: Path) -> list[list[Any]]:
    rows = []
    for run in sorted((folder / "runs").glob("smoke-*")):
        metrics_file = run / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line] \
            if metrics_file.is_file() else []
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        last = metrics[-1] if metrics else {}
        rows.append([run.name, len(metrics), last.get("step", ""), f"{last['train/loss']:.4f}" if metrics else "",
                     f"{last.get('perf/samples_per_s', 0):.1f}" if metrics else "", ", ".join(checkpoints) or "none"])
    return rows


def resume_line(folder: Path) -> str:
    log = folder / "logs" / "smoke-resume.log"
    if not log.is_file():
        return "resume: not run"
    text = log.read_text(errors="replace")
    found = [line.strip() for line in text.splitlines() if "resumed from" in line]
    return f"resume: {found[-1]}" if found else "resume: no 'resumed from' line in logs/smoke-resume.log"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    env = _json(folder, "env") or {}
    lines = [f"# GPU check ({args.mode})", "",
             f"device {env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda')}); "
             f"deepspeed {env.get('deepspeed', '?')}; Python {env.get('python', '?')}; commit {env.get('commit')}; "
             f"{env.get('date', '?')}", "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "note"], _steps(folder))

    lines += ["", "## Training step (bench/train_step.py): MFU against the same run's matmul peak", ""]
    lines += _table(["run", "network", "batch", "precision", "step ms", "samples/s", "GFLOP/sample",
                     "TFLOP/s", "MFU", "peak GiB"],
                    step_rows(folder, ["step-base64", "step-sr256", "peer-base64", "lever-attention",
                                       "lever-norm", "lever-compile", "lever-batch"]))

    lines += ["", f"## The trainer against the bare step (bench/trainer_overhead.py), goal >= {TRAINER_GOAL}", ""]
    rows = []
    for name in ("trainer-base64", "trainer-sr256"):
        r = _json(folder, name)
        rows.append([name, "not measured" + _skip_note(folder, name), "", "", ""] if r is None else
                    [name, f"{r['config']} b{r['batch']} {r['precision']} ZeRO-{r['zero_stage']}",
                     f"{r['trainer_samples_per_s']:.1f}", f"{r['bare_samples_per_s']:.1f}", f"{r['ratio']:.3f}"])
    lines += _table(["run", "setting", "trainer samples/s", "bare samples/s", "trainer / bare"], rows)

    lines += ["", "## Trainer smoke runs (launcher, default optimizer)", ""]
    lines += _table(["run", "log lines", "last step", "last loss", "samples/s", "checkpoints"], smoke_rows(folder))
    lines += ["", resume_line(folder)]

    for name, title in (("sampling", "Sampling"), ("sampling-table", "Inference memory table")):
        result = _json(folder, name)
        lines += ["", f"## {title} (bench/sampling.py)", ""]
        if result is None or not result.get("runs"):
            lines.append("not measured" + _skip_note(folder, name))
            continue
        lines += [result["table"], ""]
        rows = [[run["precision"], run["batch"], run["status"], st["stage"], st.get("dtype", ""),
                 f"{st['load_s']:.2f}", f"{st['first_image_s']:.2f}", f"{st['steady_images_per_s']:.3g}",
                 st["nfe_per_image"], f"{st['ms_per_call']:.1f}" if st.get("ms_per_call") else "",
                 f"{st['peak_mem_gib']:.2f}"]
                for run in result["runs"] for st in run.get("stages", []) if st["stage"] != "text_encoder"]
        lines += _table(["precision", "batch", "run", "stage", "dtype", "load s", "first image s", "steady img/s",
                         "calls/image", "ms/call", "peak GiB"], rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
