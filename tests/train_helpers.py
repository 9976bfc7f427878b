"""Launching tiny 2-rank CPU training jobs from tests: the helpers live in bench/tiny_runs.py,
which bench/kill_resume.py launches its runs with too (bench imports no test module)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from tiny_runs import HOOKS, REPO, free_port, launch_command, read_metrics, run_training, tiny_overrides, train_env  # noqa: E402

__all__ = ["HOOKS", "REPO", "free_port", "launch_command", "read_metrics", "run_training", "tiny_overrides", "train_env"]
