"""W&B and metrics.jsonl across restarts: one run, every step logged exactly once.

The W&B checks read what real offline wandb wrote (`offline-run-*/run-<id>.wandb`) with wandb's
own reader of that file (wandb-core, through `wandb leet inspect --json`): an oracle independent
of the parser the logger uses to find what W&B already holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagen_train.config import LoggingConfig
from imagen_train.utils.logging import LOGGED, MetricLogger
from train_helpers import REPO, read_metrics, run_training, tiny_overrides

JOB = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from imagen_train.config import LoggingConfig
    from imagen_train.utils.logging import MetricLogger
    run_dir, run_id, fresh, kill = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1", sys.argv[4] == "1"
    logger = MetricLogger(LoggingConfig(wandb_mode="offline", progress_bar=False), Path(run_dir), {{}},
                          run_id=run_id, fresh=fresh)
    print("RUN_ID=" + logger.run_id, flush=True)
    for step in map(int, sys.argv[5:]):
        logger.log({{"train/loss": 1.0 / step}}, step)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)  # no finish(), no flush: a node dying
    logger.close()
""")


def _job(run_dir: Path, steps, run_id: str | None = None, fresh: bool = False, kill: bool = False) -> str:
    """Log `steps` from a new process; returns the W&B run id it used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-c", JOB.format(), str(run_dir), run_id or "", str(int(fresh)),
                           str(int(kill)), *map(str, steps)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == (-signal.SIGKILL if kill else 0), proc.stderr[-3000:]
    return next(line[len("RUN_ID="):] for line in proc.stdout.splitlines() if line.startswith("RUN_ID="))


def wandb_rows(run_dir: Path, run_id: str) -> list[tuple[int, dict]]:
    """(step, logged values) of every history row W&B holds for `run_id`, over all its offline
    run folders, in order.

    Read by wandb's own reader of its transaction log (wandb-core, `wandb leet inspect --json`),
    not by ours (`imagen_train.utils.logging.wandb_logged_steps`), so a misreading of the format
    by ours cannot hide here.
    """
    rows = []
    for path in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # none: all lost
        rows += [(int(r["history"]["step"]["num"]), r["history"]["item"]) for r in records if r["type"] == "history"]
    return rows


def wandb_history(run_dir: Path, run_id: str) -> list[int]:
    """The steps of `wandb_rows`, each row holding the `train/loss` = 1/step the jobs log."""
    rows = wandb_rows(run_dir, run_id)
    for step, item in rows:
        assert item.get("train/loss") == pytest.approx(1.0 / step), (step, item)
    return [step for step, _ in rows]


@pytest.mark.multirank
def test_restart_before_the_first_checkpoint_continues_the_same_run(tmp_path):
    """Killed at step 5 with no checkpoint; the restart trains (and logs) from step 1 again."""
    first = _job(tmp_path, range(1, 6), kill=True)
    second = _job(tmp_path, range(1, 9))
    assert second == first
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 9))
    assert wandb_history(tmp_path, first) == list(range(1, 9))
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{first}"))) == 2


@pytest.mark.multirank
@pytest.mark.parametrize("killed", [True, False])
def test_replayed_steps_after_a_checkpoint_are_logged_once(tmp_path, killed):
    """Logged up to step 7, checkpoint at 4: the replay of 5-7 adds nothing, 8-10 follow. Killed,
    W&B lost the first job's points (they come back from metrics.jsonl); ended cleanly, W&B has
    them and they are not sent twice."""
    run_id = _job(tmp_path, range(1, 8), kill=killed)
    assert _job(tmp_path, range(5, 11), run_id=run_id) == run_id  # the checkpoint's id
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert [m["train/loss"] for m in metrics] == [1.0 / s for s in range(1, 11)]
    assert wandb_history(tmp_path, run_id) == list(range(1, 11))


@pytest.mark.multirank
def test_starting_over_opens_a_new_run(tmp_path):
    old = _job(tmp_path, range(1, 4))
    new = _job(tmp_path, range(1, 3), fresh=True)
    assert new != old
    assert wandb_history(tmp_path, new) == [1, 2] and wandb_history(tmp_path, old) == [1, 2, 3]
    state = json.loads((tmp_path / LOGGED).read_text())
    assert (state["wandb_id"], state["step"], state["keys"]) == (new, 2, ["train/loss"])
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 1, 2]  # the file keeps both


def test_the_last_logged_step_takes_only_new_keys(tmp_path):
    cfg = LoggingConfig(wandb_mode="disabled", progress_bar=False)
    first = MetricLogger(cfg, tmp_path, {})
    first.log({"train/loss": 0.5}, 5)
    first.log({"eval/fid": 30.0}, 6)  # killed before the trainer logged step 6
    first.close()
    again = MetricLogger(cfg, tmp_path, {})
    for step in (5, 6):
        again.log({"train/loss": 0.4}, step)
        again.log({"eval/fid": 31.0}, step)
    again.log({"train/loss": 0.3}, 7)
    again.close()
    rows = [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(tmp_path)]
    assert rows == [{"step": 5, "train/loss": 0.5}, {"step": 6, "eval/fid": 30.0},
                    {"step": 6, "train/loss": 0.4}, {"step": 7, "train/loss": 0.3}]


@pytest.mark.multirank
@pytest.mark.timeout(900)
def test_killed_training_logs_every_step_once_to_one_wandb_run(tmp_path, shards_64):
    """The trainer end to end (2 ranks): SIGKILL at step 3 (no checkpoint yet), then at step 7
    (checkpoint at 4), then a run to the end: one W&B run, steps 1-8 once each."""
    run_dir = tmp_path / "run"
    sets = tiny_overrides(run_dir, shards_64.pattern, shards_64.embed_dim, max_steps=8,
                          **{"checkpoint.every_steps": 4, "logging.wandb_mode": "offline"})
    for kill_at in (3, 7):
        run_training("base64-tiny.yaml", sets, expect_rc=1, WANDB_SILENT="true",
                     IMAGEN_TRAIN_FAULT_KILL_STEPS=f"{kill_at}@0")
    run_training("base64-tiny.yaml", sets, WANDB_SILENT="true")
    run_id = json.loads((run_dir / LOGGED).read_text())["wandb_id"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 3
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 3
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    rows = wandb_rows(run_dir, run_id)
    assert [step for step, _ in rows] == list(range(1, 9))
    # The points W&B holds (some re-sent from metrics.jsonl after a kill) are those trained.
    assert [item["train/loss"] for _, item in rows] == pytest.approx([m["train/loss"] for m in metrics])
