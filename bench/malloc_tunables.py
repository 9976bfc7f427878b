"""Training ranks on a CPU with and without imagen_train.utils.cpu_env's allocator settings.

    python bench/malloc_tunables.py [--config configs/quickstart-base64.yaml] [--steps 60]
        [--rounds 3] [--shards PATTERN] [--set key=value ...] [--json OUT]

Each round launches the same 2-rank run (`deepspeed --num_gpus 2 launch/train.py`, fp32, the
config's batch and ZeRO stage, checkpoint only at the end) twice: once with glibc's defaults and
once with GLIBC_TUNABLES=CPU_MALLOC_TUNABLES, in alternating order, so a shared machine's slow
spells touch both alike. Per run: the median logged step time (perf/step_s, the first window
left out), and the launch's CPU seconds, system seconds and minor page faults (its waited-for
processes). Reported: the medians of each over the rounds, and plain / tuned. Without --shards,
synthetic shards at the config's output size are made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from imagen_train.config import load_config  # noqa: E402
from imagen_train.utils.cpu_env import CPU_MALLOC_TUNABLES  # noqa: E402
from tiny_runs import free_port  # noqa: E402
from trainer_overhead import make_shards  # noqa: E402


def launch(config: str, shards: str, run_dir: Path, steps: int, tunables: bool, sets: list[str]) -> dict:
    """One 2-rank run; its step time and the CPU its processes used."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), "--config", config]
    for item in (f"run_dir={run_dir}", f"data.train_shards={shards}", f"training.max_steps={steps}",
                 f"checkpoint.every_steps={steps}", "training.log_every_steps=5", "training.precision=fp32",
                 "logging.wandb_mode=disabled", "logging.progress_bar=false", *sets):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if tunables:
        env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"the run in {run_dir} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"step_s": statistics.median(r["perf/step_s"] for r in rows[1:]),
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}


def main(argv: "list[str] | None" = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart-base64.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default=None, help="training shards with embeddings (default: synthetic)")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="a config override for every run")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp) / "data", load_config(args.config, args.sets), 256)
        runs: dict[str, list[dict]] = {"plain": [], "tuned": []}
        for r in range(args.rounds):
            for name in (("plain", "tuned") if r % 2 == 0 else ("tuned", "plain")):
                runs[name].append(launch(args.config, shards, Path(tmp) / f"{name}{r}", args.steps,
                                         name == "tuned", args.sets))
                print(f"[malloc_tunables] round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    median = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
    result = {"config": args.config, "steps": args.steps, "rounds": args.rounds, "tunables": CPU_MALLOC_TUNABLES,
              "median": median, "plain_over_tuned": {k: median["plain"][k] / median["tuned"][k] for k in median["plain"]},
              "runs": runs}
    print(json.dumps({k: result[k] for k in ("median", "plain_over_tuned")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
