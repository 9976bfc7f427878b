"""The summary of one bench/gpu_check.sh run: every figure in one Markdown file.

    python bench/gpu_summary.py WORK_DIR [--mode gpu|rehearse] [--budget S] > OUT/summary.md

Reads what the check's steps left in its work folder: steps.tsv (status and seconds of each
step), json/*.json (bench/train_step.py, bench/trainer_overhead.py, bench/norm_act.py,
bench/sampling.py, env), runs/*/metrics.jsonl (the trainer smoke runs), logs/smoke-resume.log
and stopped.txt. The check rewrites the summary after every step, so this runs on whatever is
there: a figure whose step did not finish reads "not measured" with the step's status; a section
that cannot be read says so and the others still print. It never fills a gap.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

MFU_GOAL = 0.45
TRAINER_GOAL = 0.95
SAMPLING_GOAL_S = 2.0       # base64-2b, batch 1, 30 steps with guidance, after load
RUN_LENGTHS = (10_000, 100_000)  # steps: what "a realistic run" means for compile's break-even


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


def _note(folder: Path, name: str) -> str:
    """'not measured (status: why)' for a figure whose step is missing, from steps.tsv."""
    for row in _steps(folder):
        if row[0] == name and row[1] != "ok":
            return f"not measured ({row[1]}: {row[3] if len(row) > 3 else ''})"
        if row[0] == name:
            return "not measured (the step passed but wrote no result)"
    return "not measured (not run yet)"


def step_rows(folder: Path, names: list[str]) -> list[list[Any]]:
    """Per network of bench/train_step.py results: step time, samples/s, FLOPs, MFU, memory."""
    rows = []
    for name in names:
        result = _json(folder, name)
        if result is None:
            rows.append([name, _note(folder, name)] + [""] * 8)
            continue
        if result.get("partial"):
            for m in result["prepared"]:
                rows.append([name, m["name"], result["batch"], result["precision"],
                             f"timed rounds not finished; first step {m['first_step_s']:.1f} s"] + [""] * 5)
            continue
        for m in result["models"]:
            goal = f" (goal {MFU_GOAL:.0%})" if m["name"] == "ours" else ""
            rows.append([name, m["name"], result["batch"], result["precision"], f"{m['step_s_median'] * 1e3:.1f}",
                         f"{m['samples_per_s']:.1f}", f"{m['flops_per_sample'] / 1e9:.1f}",
                         f"{m['achieved_tflops']:.2f}", f"{m['mfu']:.1%}{goal}", f"{m['peak_mem_gib']:.2f}"])
        if "ratio" in result:
            rows.append([name, "ours / peer", "", "", "", f"{result['ratio']['samples_per_s']:.3f}x", "", "", "",
                         f"{result['ratio']['peak_mem']:.2f}x"])
    return rows


def lever_rows(folder: Path, names: list[str]) -> list[list[Any]]:
    """ours / baseline per baseline of each before/after run (> 1: ours, the default, is faster)."""
    rows = []
    for name in names:
        result = _json(folder, name)
        if result is None or result.get("partial"):
            rows.append([name, _note(folder, name) if result is None else "timed rounds not finished"] + [""] * 4)
            continue
        models = {m["name"]: m for m in result["models"]}
        for s in result.get("speedups", []):
            before = models[s["label"]]
            rows.append([name, s["baseline"], f"{models['ours']['step_s_median'] * 1e3:.1f}",
                         f"{before['step_s_median'] * 1e3:.1f}", f"{s['samples_per_s']:.3f}x", f"{s['peak_mem']:.2f}x"])
    return rows


def compile_lines(folder: Path, name: str = "lever-compile") -> list[str]:
    """Compile time, speed-up and break-even of regional compile against eager (one process)."""
    result = _json(folder, name)
    if result is None:
        return [_note(folder, name)]
    if result.get("partial"):
        ours = result["prepared"][0]
        return [f"compiled and warm, timed rounds not finished: first step {ours['first_step_s']:.1f} s "
                f"(compile included); dynamo {ours['compile']}"]
    models = {m["name"]: m for m in result["models"]}
    ours = models["ours"]
    eager = next((m for m in result["models"] if m["name"].startswith("ours, eager")), None)
    if eager is None:
        return ["no eager baseline in this run"]
    compile_s = ours["first_step_s"] - ours["step_s_median"]
    saved_s = eager["step_s_median"] - ours["step_s_median"]
    lines = [f"- {result['config']} batch {result['batch']} {result['precision']}",
             f"- compile ({ours['compile_mode']}): first step {ours['first_step_s']:.1f} s, so about "
             f"{compile_s:.1f} s of compiling; dynamo: {ours['compile']}",
             f"- step: compiled {ours['step_s_median'] * 1e3:.1f} ms, eager {eager['step_s_median'] * 1e3:.1f} ms "
             f"({eager['step_s_median'] / ours['step_s_median']:.3f}x); peak memory "
             f"{ours['peak_mem_gib']:.2f} against {eager['peak_mem_gib']:.2f} GiB"]
    if saved_s <= 0:
        lines.append("- compiled is not faster per step: compile stays off by default")
    else:
        even = compile_s / saved_s
        verdicts = ", ".join(f"{n:,} steps save {(n * saved_s - compile_s) / 3600:.2f} h" for n in RUN_LENGTHS)
        lines.append(f"- break-even after {even:,.0f} steps; {verdicts}: compile pays on a run longer than "
                     f"{even:,.0f} steps (turn it on by default only with a GPU run that confirms it)")
    return lines


def norm_rows(folder: Path) -> tuple[str, list[list[Any]]]:
    result = _json(folder, "norm-region")
    if result is None:
        return _note(folder, "norm-region"), []
    rows = []
    for shape in result["shapes"]:
        region = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in shape["region_ms"].items())
        gn = shape.get("groupnorm", {})
        cells = [f"{v['ms']:.2f} ms, {v['saved_bytes'] / 2**20:.1f} MiB, err {v['out_err']:.1e} / {v['grad_err']:.1e}"
                 for v in (gn.get("gn"), gn.get("gn-fp32-copy")) if v]
        rows.append([f"{shape['channels']} ch x {shape['resolution']} px", region] + (cells or ["", ""]))
    return result["header"], rows


def trainer_rows(folder: Path) -> list[list[Any]]:
    rows = []
    for name in ("trainer-base64", "trainer-sr256"):
        r = _json(folder, name)
        rows.append([name, _note(folder, name), "", "", ""] if r is None else
                    [name, f"{r['config']} b{r['batch']} {r['precision']} ZeRO-{r['zero_stage']}",
                     f"{r['trainer_samples_per_s']:.1f}", f"{r['bare_samples_per_s']:.1f}", f"{r['ratio']:.3f}"])
    return rows


def smoke_rows(folder: Path) -> list[list[Any]]:
    rows = []
    for run in sorted((folder / "runs").glob("smoke-*")):
        metrics_file = run / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
            if metrics_file.is_file() else []
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        last = metrics[-1] if metrics else {}
        rows.append([run.name, len(metrics), last.get("step", ""), f"{last['train/loss']:.4f}" if "train/loss" in last
                     else "", f"{last.get('perf/samples_per_s', 0):.1f}" if metrics else "",
                     ", ".join(checkpoints) or "none"])
    return rows


def resume_line(folder: Path) -> str:
    log = folder / "logs" / "smoke-resume.log"
    if not log.is_file():
        return "resume: not run"
    found = [line.strip() for line in log.read_text(errors="replace").splitlines() if "resumed from" in line]
    return f"resume: {found[-1]}" if found else "resume: no 'resumed from' line in logs/smoke-resume.log"


def sampling_goal_rows(result: dict[str, Any]) -> list[list[Any]]:
    """The sampling goal per run: base stage time per image after load, against SAMPLING_GOAL_S
    (judged only where the run is the goal's: the real presets, 30 steps, guided, batch 1)."""
    judged = result.get("presets") == "real" and result.get("steps") == 30 and result.get("guidance", 1) != 1
    rows = []
    for run in result["runs"]:
        stages = {s["stage"]: s for s in run.get("stages", [])}
        base, text = stages.get("base64"), stages.get("text_encoder")
        if base is None:
            rows.append([run.get("label", run["precision"]), run["batch"], run["status"][:80]] + [""] * 6)
            continue
        per_image = base["steady_s"] / base["steady_images"] if base["steady_images"] else None
        after_load = f"{per_image:.2f}" if per_image is not None else "n/a (1 batch)"
        met = "" if per_image is None or not judged or run["batch"] != 1 else (
            " (met)" if per_image <= SAMPLING_GOAL_S else " (not met)")
        rows.append([run.get("label", run["precision"]), run["batch"], base.get("dtype", ""),
                     f"{base['first_batch_s']:.2f}", after_load + met, f"{base['ms_per_call']:.1f}" if base.get(
                         "ms_per_call") else "", f"{text['time_s']:.2f}" if text else "", f"{base['load_s']:.2f}",
                     f"{sum(s['first_image_s'] for s in stages.values()):.2f}"])
    return rows


def sampling_lines(folder: Path, name: str, title: str) -> list[str]:
    result = _json(folder, name)
    lines = ["", f"## {title} (bench/sampling.py)", ""]
    if result is None or not result.get("runs"):
        return lines + [_note(folder, name)]
    lines += [f"{result['steps']} steps, guidance {result['guidance']}, exports {result.get('export_dtype')}, "
              f"text encoder {result.get('text_encoder')}", ""]
    if name == "sampling":
        lines += [f"Goal: base64-2b, batch 1, 30 steps with guidance in <= {SAMPLING_GOAL_S:g} s after load; "
                  "time to first image with the encoder's load apart.", ""]
        lines += _table(["run", "batch", "dtype", "first batch s", "s per image after load", "ms/call",
                         "text encoder s (load + encode)", "base64 load s", "time to first image s"],
                        sampling_goal_rows(result))
    else:
        lines += [result["table"]]
    return lines


def _section(lines: list[str], title: str, body: Callable[[], list[str]]) -> None:
    """Append a section; a section that cannot be read says why instead of ending the summary."""
    lines += ["", f"## {title}", ""]
    try:
        lines += body()
    except Exception as err:  # a half-written or unexpected file must not cost the other figures
        lines.append(f"could not read this section: {type(err).__name__}: {err}")


def summary(folder: Path, mode: str, budget: Optional[int] = None) -> str:
    """The whole summary of the check's work folder, as Markdown."""
    env = _json(folder, "env") or {}
    steps = _steps(folder)
    elapsed = folder / "elapsed.txt"
    used = elapsed.read_text().strip() if elapsed.is_file() else "?"
    lines = [f"# GPU check ({mode})", ""]
    stopped = folder / "stopped.txt"
    if stopped.is_file():
        lines += [f"**{stopped.read_text().strip()}**", ""]
    lines += [f"device {env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda')}); "
              f"deepspeed {env.get('deepspeed', '?')}; Python {env.get('python', '?')}; commit {env.get('commit')}; "
              f"{env.get('date', '?')}; {used} s elapsed" + (f" of a {budget} s budget" if budget else ""),
              "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "note"], steps)
    _section(lines, "Training step (bench/train_step.py): MFU against the same run's matmul peak", lambda: _table(
        ["run", "network", "batch", "precision", "step ms", "samples/s", "GFLOP/sample", "TFLOP/s", "MFU", "peak GiB"],
        step_rows(folder, ["step-base64", "step-sr256", "peer-base64", "lever-batch"])))
    _section(lines, f"The trainer against the bare step (bench/trainer_overhead.py), goal >= {TRAINER_GOAL}",
             lambda: _table(["run", "setting", "trainer samples/s", "bare samples/s", "trainer / bare"],
                            trainer_rows(folder)))
    _section(lines, "Levers, before / after in one process (ours = the defaults; > 1: the default is faster)",
             lambda: _table(["run", "baseline", "ours step ms", "baseline step ms", "ours / baseline samples/s",
                             "peak memory ours / baseline"],
                            lever_rows(folder, ["levers-norm", "levers-kernels", "lever-compile", "lever-compile-nhwc"])))
    _section(lines, "torch.compile (regional) against eager", lambda: compile_lines(folder))

    def norm() -> list[str]:
        header, rows = norm_rows(folder)
        return [header, ""] + (_table(["map", "region ms (median)", "GroupNorm in place", "GroupNorm on a fp32 copy"],
                                      rows) if rows else [])
    _section(lines, "The GroupNorm -> FiLM -> SiLU region and GroupNorm's numerics (bench/norm_act.py)", norm)
    _section(lines, "Trainer smoke runs (launcher, default optimizer)", lambda: _table(
        ["run", "log lines", "last step", "last loss", "samples/s", "checkpoints"], smoke_rows(folder))
        + ["", resume_line(folder)])
    for name, title in (("sampling", "Sampling"), ("sampling-table", "Inference memory table")):
        try:
            lines += sampling_lines(folder, name, title)
        except Exception as err:  # as in _section
            lines += ["", f"## {title}", "", f"could not read this section: {type(err).__name__}: {err}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="the check's work folder")
    parser.add_argument("--mode", default="gpu")
    parser.add_argument("--budget", type=int)
    args = parser.parse_args(argv)
    print(summary(Path(args.folder), args.mode, args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
