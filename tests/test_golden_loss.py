"""The golden loss curve: 50 steps of the tiny base64 preset must repeat the stored losses.

Exact-resume tests compare two runs of the same code, so a change that shifts every run alike
(a loss weighting, a layer, the noise-level draw, the optimizer or LR schedule, the data
pipeline) passes them silently. This test compares against losses recorded once
(tests/golden/base64-tiny-losses.json, by tests/golden/run_golden.py through the real Trainer on
one rank). A deliberate numerical change re-records them (`python tests/golden/run_golden.py
--record`) and the commit says why.

Tolerance, per step, relative to the stored loss:
- steps 1-25: 1e-4. The first losses depend on the initial weights, the data and the noise draws
  and little on accumulated rounding: on the 2-core dev VM, running with 2 threads instead of 1
  (another summation order) changed them by at most 4e-7. A change to any of those moves them
  by far more.
- steps 26-50: 5e-3. Rounding differences grow as training amplifies them; 2 threads instead
  of 1 reached 3e-5 by step 43 and 4.5e-4 at step 50. 5e-3 keeps a 10x margin for another CPU's
  kernels while still failing on an optimizer or LR change (a halved LR moves these losses by
  percents).
Same machine, same library versions: the losses repeat bit for bit (the recipe runs on one
thread).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_helpers import REPO, train_env

GOLDEN = REPO / "tests" / "golden" / "base64-tiny-losses.json"
EARLY_STEPS, EARLY_RTOL, LATE_RTOL = 25, 1e-4, 5e-3


def compare(losses: list[float], golden: list[float]) -> list[str]:
    """The steps (1-based) whose loss is off by more than the tolerance, described."""
    if len(losses) != len(golden):
        return [f"{len(losses)} losses, the golden file has {len(golden)}"]
    bad = []
    for step, (got, want) in enumerate(zip(losses, golden), start=1):
        rtol = EARLY_RTOL if step <= EARLY_STEPS else LATE_RTOL
        if not abs(got - want) <= rtol * abs(want):
            bad.append(f"step {step}: {got:.7g} vs golden {want:.7g} (rel {abs(got - want) / abs(want):.1e} > {rtol:g})")
    return bad


def test_compare_flags_drift_by_step():
    golden = [1.0] * 50
    assert compare(golden, golden) == []
    assert compare([1.00005] * 50, golden) == []
    early = compare([1.0002] + [1.0] * 49, golden)
    assert len(early) == 1 and early[0].startswith("step 1:")
    assert compare([1.0] * 49 + [1.004], golden) == []
    assert compare([1.0] * 49 + [1.006], golden)[0].startswith("step 50:")
    assert compare([1.0] * 49, golden) == ["49 losses, the golden file has 50"]
    assert compare([float("nan")] * 50, golden)  # NaN never passes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_losses_match_the_golden_curve(tmp_path):
    out = tmp_path / "losses.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "golden" / "run_golden.py"), "--out", str(out)],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = json.loads(out.read_text())["losses"]
    golden = json.loads(GOLDEN.read_text())["losses"]
    bad = compare(losses, golden)
    assert not bad, ("the loss curve drifted from tests/golden/base64-tiny-losses.json; if the change is "
                     "deliberate, re-record with `python tests/golden/run_golden.py --record` and say why "
                     "in the commit:\n" + "\n".join(bad[:10]))
