"""The trainer talks to its engine through training/engine_api.py only: no DeepSpeed import, no
DeepSpeed attribute, nothing of the engine but the interface; and DeepSpeed's implementation
(training/engine.py) and the test-side fault wrapper (tests/hooks/hook_faults.py) provide it."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

from imagen_train.training import engine as deepspeed_engine
from imagen_train.training.engine_api import Engine

REPO = Path(__file__).resolve().parent.parent
TRAINING = REPO / "imagen_train" / "training"
# The trainer and the pieces it hands its engine to.
ENGINE_USERS = ("trainer.py", "checkpoint.py", "resume.py", "step_metrics.py", "bad_steps.py")


def interface() -> set[str]:
    """The members of the Engine protocol: its attributes and methods."""
    methods = {name for name, value in vars(Engine).items() if callable(value) and not name.startswith("_")}
    return methods | set(typing.get_type_hints(Engine)) | {"__call__"}


def _engine_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, attribute) of every attribute read on an engine: `self.engine.X`, `engine.X`, `built.X`."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "engine" and isinstance(owner.value, ast.Name) \
                and owner.value.id == "self":
            out.append((node.lineno, node.attr))
        elif isinstance(owner, ast.Name) and owner.id in ("engine", "built"):
            out.append((node.lineno, node.attr))
    return out


def test_trainer_uses_only_the_engine_interface():
    members = interface()
    assert {"backward", "step", "grad_norm", "lr", "master_weights", "master_layout", "save", "load",
            "load_resharded", "device", "dtype", "accum_steps"} <= members
    seen = set()
    for name in ENGINE_USERS:
        path = TRAINING / name
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in modules), f"{name} imports DeepSpeed"
            assert not any(m.endswith("deepspeed_internals") for m in modules), f"{name} imports deepspeed_internals"
        for line, attr in _engine_reads(tree):
            assert attr in members, f"training/{name}:{line} reads engine.{attr}, which training/engine_api.py lacks"
            seen.add(attr)
    assert {"backward", "step", "save", "load"} <= seen  # the check does see the trainer's calls


def test_implementations_provide_the_interface():
    """DeepSpeedEngine defines every method of the protocol with its parameters, and sets its
    attributes; the fault wrapper overrides only protocol methods (the rest it passes on)."""
    for name in interface() - set(typing.get_type_hints(Engine)):
        ours = getattr(deepspeed_engine.DeepSpeedEngine, name, None)
        assert callable(ours), f"DeepSpeedEngine lacks {name}"
        if name != "__call__":
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(getattr(Engine, name)).parameters), name
    init = inspect.getsource(deepspeed_engine.DeepSpeedEngine.__init__)
    for attribute in typing.get_type_hints(Engine):
        assert f"self.{attribute} =" in init, f"DeepSpeedEngine does not set {attribute}"
    hooks = ast.parse((REPO / "tests" / "hooks" / "hook_faults.py").read_text())
    faulty = next(n for n in ast.walk(hooks) if isinstance(n, ast.ClassDef) and n.name == "FaultyEngine")
    overridden = {n.name for n in faulty.body if isinstance(n, ast.FunctionDef)} - {"__init__", "__getattr__"}
    assert overridden and overridden <= interface(), overridden - interface()
