"""The tiers of tests/conftest.py: what counts as launching ranks, and that the unit tier refuses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import rank_launcher


def test_rank_launchers_are_recognised_and_single_processes_are_not():
    assert rank_launcher([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "x.py"]) == \
        "torch.distributed.run"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")  # as tests launch it
    assert rank_launcher([deepspeed, "--num_gpus", "2", "launch/train.py"]) == deepspeed
    assert rank_launcher("sbatch --parsable job.sbatch") == "sbatch"
    assert rank_launcher([sys.executable, "launch/train.py", "--print-config"]) is None
    assert rank_launcher([sys.executable, "-c", "import deepspeed_config"]) is None


def test_a_unit_test_that_launches_ranks_fails_naming_the_marker():
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.multirank"):
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--help"])


@pytest.mark.multirank
def test_a_multirank_test_may_launch_them():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True)
    assert proc.returncode == 0


def test_a_stand_in_script_named_like_a_launcher_is_not_one(tmp_path):
    assert rank_launcher([str(tmp_path / "torchrun"), "x.py"]) is None
