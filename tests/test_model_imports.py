"""Import isolation: importing models/ or diffusion/ in a fresh interpreter loads no YAML, DeepSpeed,
W&B or webdataset, and none of our modules it loads talks to torch.distributed.

`import torch` alone loads `torch.distributed` (torch 2.x imports it from its own package), so
"torch.distributed in sys.modules" says nothing about our code. What is meaningful is whether
any of *our* modules that the import pulls in, directly or through each other, imports
torch.distributed: the subprocess lists the `imagen_train` modules actually loaded, and each
one's source is parsed for imports of the forbidden packages. tests/test_models.py parses only
the files under models/ and diffusion/ themselves; this follows the chain to what they import
(e.g. `imagen_train.schema`, `imagen_train.stages`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NEVER_LOADED = ("yaml", "deepspeed", "wandb", "webdataset")
NEVER_IMPORTED = NEVER_LOADED + ("torch.distributed",)
# Our modules above models/diffusion in the layering: loading one would bring its dependencies.
NOT_OURS_TO_LOAD = ("imagen_train.config", "imagen_train.training", "imagen_train.evaluation",
                    "imagen_train.utils.dist", "imagen_train.utils.logging", "imagen_train.data")

PROBE = """
import json, sys
import {package}
print(json.dumps({{"loaded": sorted({{m.split(".")[0] for m in sys.modules}} & set({never!r})),
                  "ours": sorted((m, getattr(sys.modules[m], "__file__", None) or "")
                                 for m in sys.modules if m.startswith("imagen_train"))}}))
"""


def imported_names(source: str) -> list[str]:
    """Every module an `import` or `from ... import` in `source` names, with `from x import y` as x.y too."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def forbidden(names: list[str]) -> list[str]:
    return [n for n in names if any(n == bad or n.startswith(bad + ".") for bad in NEVER_IMPORTED)]


def load_in_fresh_interpreter(package: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE.format(package=package, never=NEVER_LOADED)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", ["imagen_train.models", "imagen_train.diffusion", "imagen_train.speedups"])
def test_package_loads_nothing_distributed_or_io(package):
    result = load_in_fresh_interpreter(package)
    assert result["loaded"] == [], f"importing {package} loaded {result['loaded']}"
    ours = dict(result["ours"])
    assert package in ours and "imagen_train.schema" in ours  # the typed configs, without YAML
    above = [m for m in ours if any(m == bad or m.startswith(bad + ".") for bad in NOT_OURS_TO_LOAD)]
    assert not above, f"importing {package} loaded {above}"
    bad = {m: forbidden(imported_names(Path(f).read_text())) for m, f in ours.items() if f.endswith(".py")}
    bad = {m: names for m, names in bad.items() if names}
    assert not bad, f"modules loaded by {package} import {bad}"


def test_the_probe_sees_a_forbidden_import():
    assert forbidden(imported_names("from torch import distributed as dist\nimport yaml\nimport torch")) == [
        "torch.distributed", "yaml"]
    assert forbidden(imported_names("import torch.distributed.elastic")) == ["torch.distributed.elastic"]
    # The config loader does read YAML: were models/ to import it, the first check above would fail.
    assert "yaml" in imported_names((REPO / "imagen_train" / "config.py").read_text())
    assert load_in_fresh_interpreter("imagen_train.config")["loaded"] == ["yaml"]
