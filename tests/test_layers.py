"""Every import in imagen_train/ (inside functions too) follows the layer table of
docs/CONTRACTS.md; DeepSpeed and torch.distributed are reached only where the doc says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "imagen_train"
DEEPSPEED_IMPORTERS = {"training/engine.py", "training/deepspeed_internals.py", "artifacts/exports.py"}
DISTRIBUTED_USERS = {"utils/dist.py", "training/engine.py"}


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


def test_imports_follow_the_layer_table():
    table = layer_table()
    assert {"config", "data", "models", "diffusion", "artifacts", "training", "evaluation"} <= set(table)
    assert "training" not in table["evaluation"] and "training" not in table["artifacts"]
    # Speed options sit below both users: the trainer and sampling share one compile function.
    assert "speedups" in table["training"] and "speedups" in table["evaluation"] and "training" not in table["speedups"]
    bad = violations(table)
    assert not bad, "imports against docs/CONTRACTS.md:\n" + "\n".join(bad)


def test_the_layer_check_catches_forbidden_imports(tmp_path):
    package = tmp_path / "imagen_train"
    (package / "evaluation").mkdir(parents=True)
    (package / "artifacts").mkdir()
    (package / "evaluation" / "probe.py").write_text(
        "from . import cascade\nfrom ..artifacts import ema\n\n\ndef f():\n    from imagen_train.training import export\n")
    (package / "artifacts" / "__init__.py").write_text("from ..evaluation import probe\n")
    (package / "elsewhere.py").write_text("import torch\n")
    assert violations(layer_table(), package) == [
        "imagen_train/artifacts/__init__.py:1: artifacts imports evaluation.probe",
        "imagen_train/elsewhere.py: in no row of the layer table",
        "imagen_train/evaluation/probe.py:6: evaluation imports training.export"]


def test_deepspeed_and_collectives_are_reached_only_where_the_doc_says():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        names = [name for _, name in imports_of(path)]
        if rel not in DEEPSPEED_IMPORTERS:
            assert not any(n == "deepspeed" or n.startswith("deepspeed.") for n in names), rel
        if rel not in DISTRIBUTED_USERS:
            assert not any(n.startswith("torch.distributed") for n in names), rel
            tree = ast.parse(path.read_text())
            uses = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                    and node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch"]
            assert not uses, f"{rel}:{uses[0]} calls torch.distributed directly (use imagen_train.utils.dist)"
