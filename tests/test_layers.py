"""The import rules, checked in one place.

1. Every import in imagen_train/ (inside functions too) follows the layer table of
   docs/CONTRACTS.md.
2. DeepSpeed and torch.distributed are reached only in the files the doc names.
3. models/ and diffusion/, and every row of the table they may import (schema, stages, ...),
   import no YAML, DeepSpeed, torch.distributed, W&B or webdataset; models/ and diffusion/
   open no files.
4. At run time, in a fresh interpreter: importing models, diffusion and speedups loads none of
   those packages (nor does anything they pull in, ours or not) and none of our modules outside
   their rows; importing evaluation, artifacts and the sampler's entry point loads neither
   DeepSpeed nor imagen_train.training.

`import torch` alone loads `torch.distributed` (torch 2.x imports it from its own package), so
the run-time check cannot look for it in sys.modules; rule 3 covers it from the source.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "imagen_train"
DEEPSPEED_IMPORTERS = {"training/engine.py", "training/deepspeed_internals.py", "artifacts/exports.py"}
DISTRIBUTED_USERS = {"utils/dist.py", "training/engine.py"}
# Rows that are single-device and free of I/O, and what neither they nor anything below them imports.
PURE_ROWS = ("models", "diffusion")
IO_PACKAGES = ("yaml", "deepspeed", "torch.distributed", "wandb", "webdataset")
FILE_CALLS = ("open", "torch.load", "torch.save", "np.load", "np.save")


def layer_table(doc: Path = REPO / "docs" / "CONTRACTS.md") -> dict[str, set[str]]:
    """{package: packages it may import} from the table's rows (`a`, `b` | `c`, `d` or 'nothing')."""
    table = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        allowed = set(re.findall(r"`([\w.]+)`", cells[2]))
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            table[name] = allowed
    return table


def _module(path: Path, package: Path = PACKAGE) -> str:
    """'training.trainer' for imagen_train/training/trainer.py; 'data' for data/__init__.py."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports, at any depth; relative ones resolved."""
    me = _module(path, root).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["imagen_train"] + package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]  # a name may be a submodule
    return out


def _owner(name: str, table: dict[str, set[str]]) -> str | None:
    """The most specific table row that `name` (e.g. 'utils.dist.rank') falls under."""
    rows = [row for row in table if name == row or name.startswith(row + ".")]
    return max(rows, key=len) if rows else None


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(table: dict[str, set[str]], package: Path = PACKAGE) -> list[str]:
    """'file:line: importer imports target' for every import of ours that its row does not allow."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        me = _module(path, package)
        mine = _owner(me, table)
        if mine is None:
            if me and path.read_text().strip():  # an empty package __init__ belongs to no row
                bad.append(f"{path.relative_to(package.parent)}: in no row of the layer table")
            continue
        for line, name in imports_of(path, package):
            if not name.startswith("imagen_train."):
                continue
            target = name.removeprefix("imagen_train.")
            row = _owner(target, table)
            if row is None or row == mine:
                continue  # a name from imagen_train/__init__.py, or its own package
            if not any(row == a or row.startswith(a + ".") for a in table[mine]):
                bad.append(f"{path.relative_to(package.parent)}:{line}: {mine} imports {target}")
    return bad


def below(rows, table: dict[str, set[str]]) -> set[str]:
    """`rows` and every row they may import, directly or through each other."""
    seen, todo = set(), list(rows)
    while todo:
        row = todo.pop()
        if row not in seen:
            seen.add(row)
            todo += [r for r in table if any(r == a or r.startswith(a + ".") for a in table[row])]
    return seen


def _calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, 'open' or 'torch.load' ...) of every call by a plain or one-dot name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                out.append((node.lineno, f.id))
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                out.append((node.lineno, f"{f.value.id}.{f.attr}"))
    return out


def impurities(table: dict[str, set[str]], package: Path = PACKAGE) -> list[str]:
    """'file:line: what' for each I/O package imported below PURE_ROWS, and each file opened in them."""
    bad = []
    rows = below(PURE_ROWS, table)
    for path in sorted(package.rglob("*.py")):
        row = _owner(_module(path, package), table)
        if row not in rows:
            continue
        rel = path.relative_to(package.parent)
        bad += [f"{rel}:{line}: imports {name}" for line, name in imports_of(path, package)
                if _under(name, IO_PACKAGES)]
        if row in PURE_ROWS:
            bad += [f"{rel}:{line}: calls {name}" for line, name in _calls(ast.parse(path.read_text()))
                    if name in FILE_CALLS]
    return bad


PROBE = """
import json, sys
{imports}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {tops!r} or m.startswith("imagen_train"))))
"""


def loaded_after(imports: str, tops=("yaml", "deepspeed", "wandb", "webdataset")) -> list[str]:
    """The modules of ours and of the packages `tops` loaded by `imports` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports, tops=set(tops))],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The rules.

def test_imports_follow_the_layer_table():
    table = layer_table()
    assert {"config", "data", "models", "diffusion", "artifacts", "training", "evaluation"} <= set(table)
    assert "training" not in table["evaluation"] and "training" not in table["artifacts"]
    assert "models" not in table["diffusion"]  # the diffusion math never sees a network class
    # Speed options sit below both users: the trainer and sampling share one compile function.
    assert "speedups" in table["training"] and "speedups" in table["evaluation"] and "training" not in table["speedups"]
    bad = violations(table)
    assert not bad, "imports against docs/CONTRACTS.md:\n" + "\n".join(bad)


def test_deepspeed_and_collectives_are_reached_only_where_the_doc_says():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        names = [name for _, name in imports_of(path)]
        if rel not in DEEPSPEED_IMPORTERS:
            assert not any(_under(n, ["deepspeed"]) for n in names), rel
        if rel not in DISTRIBUTED_USERS:
            assert not any(_under(n, ["torch.distributed"]) for n in names), rel
            tree = ast.parse(path.read_text())
            uses = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch"]
            assert not uses, f"{rel}:{uses[0]} calls torch.distributed directly (use imagen_train.utils.dist)"


def test_models_and_diffusion_import_no_distributed_or_io_and_open_no_files():
    table = layer_table()
    rows = below(PURE_ROWS, table)
    assert {"models", "diffusion", "schema", "stages"} <= rows and not rows & {"config", "data", "training"}
    bad = impurities(table)
    assert not bad, "models/diffusion (or a row below them) reach for I/O:\n" + "\n".join(bad)


def test_importing_models_and_diffusion_loads_no_io_at_run_time():
    table = layer_table()
    loaded = loaded_after("import imagen_train.models, imagen_train.diffusion, imagen_train.speedups")
    ours = [m.removeprefix("imagen_train.") for m in loaded if m.startswith("imagen_train.")]
    assert {"models", "diffusion", "speedups", "schema"} <= set(ours)  # the typed configs, without YAML
    assert not [m for m in loaded if not m.startswith("imagen_train")], f"loaded {loaded}"
    allowed = below(PURE_ROWS + ("speedups",), table)
    parents = {m for m in ours if any(row.startswith(m + ".") for row in table)}  # e.g. `utils` for utils.signals
    outside = [m for m in ours if _owner(m, table) not in allowed and m not in parents]
    assert not outside, f"importing models/diffusion/speedups loaded {outside}"


def test_evaluation_and_sampling_load_neither_deepspeed_nor_training():
    loaded = loaded_after(
        "import imagen_train.evaluation, imagen_train.evaluation.cascade, imagen_train.evaluation.periodic, "
        "imagen_train.evaluation.sweep, imagen_train.artifacts\n"
        "import importlib.util\n"  # launch/sample.py's own imports, without running it
        f"spec = importlib.util.spec_from_file_location('sample', {str(REPO / 'launch' / 'sample.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "from imagen_train.evaluation.cascade import generate, time_to_first_image, write_outputs\n",
        tops=("deepspeed",))
    assert "imagen_train.evaluation.cascade" in loaded and "imagen_train.artifacts" in loaded
    assert [m for m in loaded if _under(m, ["deepspeed", "imagen_train.training"])] == []


# ----------------------------------------------------------------------------------------------
# The checkers catch what they are for.

def test_the_layer_check_catches_forbidden_imports(tmp_path):
    package = tmp_path / "imagen_train"
    (package / "evaluation").mkdir(parents=True)
    (package / "artifacts").mkdir()
    (package / "evaluation" / "probe.py").write_text(
        "from . import cascade\nfrom ..artifacts import ema\n\n\ndef f():\n    from imagen_train.training import init_from\n")
    (package / "artifacts" / "__init__.py").write_text("from ..evaluation import probe\n")
    (package / "elsewhere.py").write_text("import torch\n")
    assert violations(layer_table(), package) == [
        "imagen_train/artifacts/__init__.py:1: artifacts imports evaluation.probe",
        "imagen_train/elsewhere.py: in no row of the layer table",
        "imagen_train/evaluation/probe.py:6: evaluation imports training.init_from"]


def test_the_purity_check_catches_io_below_models_and_diffusion(tmp_path):
    package = tmp_path / "imagen_train"
    (package / "models").mkdir(parents=True)
    (package / "diffusion").mkdir()
    (package / "training").mkdir()
    (package / "models" / "net.py").write_text(
        "import torch\nfrom torch import distributed as dist\n\n\ndef f():\n    import yaml\n    return open('x')\n")
    (package / "diffusion" / "sample.py").write_text("import torch\n\n\ndef g(x):\n    torch.save(x, 'x.pt')\n")
    (package / "schema.py").write_text("import wandb.sdk\n")  # below models: the rule reaches it
    (package / "training" / "loop.py").write_text("import deepspeed\nopen('log')\n")  # not below: allowed
    assert impurities(layer_table(), package) == [
        "imagen_train/diffusion/sample.py:5: calls torch.save",
        "imagen_train/models/net.py:2: imports torch.distributed",
        "imagen_train/models/net.py:6: imports yaml",
        "imagen_train/models/net.py:7: calls open",
        "imagen_train/schema.py:1: imports wandb.sdk"]


def test_the_run_time_probe_sees_a_package_load():
    # The config loader does read YAML: were models/ to import it, the run-time check would fail.
    assert "yaml" in loaded_after("import imagen_train.config")
