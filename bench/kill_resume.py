"""kill -9 at random steps, N times: how many runs resume to the uninterrupted result, and the work lost.

    python bench/kill_resume.py --runs 10 [--max-steps 16 --every 4 --seed 0 --work /tmp/kill-bench]

Each trial launches the tiny base64 preset on 2 CPU ranks (torchrun), SIGKILLs a random rank at
a random step (after the optimizer update, or in the middle of writing that step's checkpoint:
the test-side fault hooks, tests/hooks/hook_faults.py, which the ranks load through PYTHONPATH),
checks that the job ended within the bound, resumes with `--resume auto` and compares the final
exported weights with those of one uninterrupted run. Work lost = the killed step minus the
step the resume started from. Prints one line per trial and a summary (and `--json` writes it).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import subprocess  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from data_tools.precompute import precompute_embeddings  # noqa: E402
from data_tools.synthetic import write_synthetic  # noqa: E402
from imagen_train import artifacts  # noqa: E402
from imagen_train.text.tiny import build_tiny_t5  # noqa: E402
from tiny_runs import REPO, launch_command, tiny_overrides, train_env  # noqa: E402



def make_shards(work: Path) -> tuple[str, int]:
    """48 synthetic 64 px samples with tiny-T5 embeddings (as the tests' `shards_64`)."""
    out = work / "shards" / "emb"
    if not out.is_dir():
        t5 = build_tiny_t5(work / "shards" / "t5", d_model=64, num_layers=2, seed=0)
        write_synthetic(out=work / "shards" / "raw", num_samples=48, resolution=64, shard_size=8, seed=0,
                        image_format="png", progress_bar=False)
        precompute_embeddings(shards=sorted(str(p) for p in (work / "shards" / "raw").glob("*.tar")),
                              encoder=str(t5), out=out, batch_size=16, progress_bar=False)
    n = len(list(out.glob("*.tar")))
    return str(out / f"{{00000..{n - 1:05d}}}.tar"), 64


def run(sets: list[str], timeout: int, **env: str) -> tuple[int, float, str]:
    start = time.monotonic()
    proc = subprocess.run(launch_command("base64-tiny.yaml", sets), cwd=REPO, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr


def final_weights(run_dir: Path, step: int, out: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / artifacts.tag_for(step)
    return load_file(str(artifacts.export_checkpoint(folder, out, include_raw=True)))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dist-timeout-s", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kill-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pattern, dim = make_shards(args.work)

    def sets(run_dir: Path) -> list[str]:
        return tiny_overrides(run_dir, pattern, dim, max_steps=args.max_steps, **{
            "checkpoint.every_steps": args.every, "data.shuffle_buffer": 8,
            "training.dist_timeout_s": args.dist_timeout_s})

    straight = args.work / "straight"
    shutil.rmtree(straight, ignore_errors=True)
    rc, _, log = run(sets(straight), 600)
    assert rc == 0, log[-3000:]
    reference = final_weights(straight, args.max_steps, args.work / "straight.safetensors")

    rng = random.Random(args.seed)
    trials = []
    for i in range(args.runs):
        where = rng.choice(["step", "save"])
        if where == "save":  # a checkpoint step (the last one too)
            step = rng.choice(range(args.every, args.max_steps + 1, args.every))
        else:
            step = rng.randint(1, args.max_steps - 1)
        victim = rng.randrange(2)
        run_dir = args.work / f"trial{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        env = {"IMAGEN_TRAIN_FAULT_KILL_SAVE_STEPS" if where == "save" else "IMAGEN_TRAIN_FAULT_KILL_STEPS":
               f"{step}@{victim}"}  # train_env puts the fault hooks (tests/hooks) on the ranks' path
        rc, exit_s, log = run(sets(run_dir), 600, **env)
        tag = artifacts.find_resume_tag(run_dir / "checkpoints", log=lambda *_: None)
        resumed_from = artifacts.step_of(tag) if tag else 0
        rc2, _, log2 = run(sets(run_dir), 600)
        ok = rc != 0 and rc2 == 0 and (f"at step {resumed_from}" in log2 if resumed_from else True)
        ok = ok and same(reference, final_weights(run_dir, args.max_steps, run_dir / "final.safetensors"))
        trial = {"trial": i, "killed": where, "step": step, "rank": victim, "exit_rc": rc,
                 "exit_s": round(exit_s, 1), "resumed_from": resumed_from, "steps_lost": step - resumed_from,
                 "resumed_correctly": bool(ok)}
        trials.append(trial)
        print(json.dumps(trial), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    good = sum(t["resumed_correctly"] for t in trials)
    lost = [t["steps_lost"] for t in trials]
    summary = {"runs": len(trials), "resumed_correctly": good, "steps_lost": lost,
               "max_steps_lost": max(lost, default=0), "checkpoint_every_steps": args.every,
               "max_exit_s": max((t["exit_s"] for t in trials), default=0.0)}
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))
    return 0 if good == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
