"""Configs from YAML: `load_config(path, overrides)` reads a file (which may name a `base:` file
to extend), applies dotted overrides such as `optim.lr=3e-5`, and returns a validated `Config`.

Every unknown key, wrong type or impossible value raises `ConfigError` naming the file, the dotted
key, what was expected and what was found. The dataclasses themselves live in
`imagen_train.schema` (no YAML there) and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from imagen_train.schema import (STAGES, CheckpointConfig, Config, ConfigError, DataConfig, DiffusionConfig,
                                 EMAConfig, EvaluationConfig, LoggingConfig, LRScheduleConfig, ModelConfig,
                                 NoiseAugConfig, OptimizerConfig, SamplerConfig, TextConfig, TrainingConfig, check)

__all__ = [
    "STAGES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "EMAConfig",
    "EvaluationConfig", "LoggingConfig", "LRScheduleConfig", "ModelConfig", "NoiseAugConfig", "OptimizerConfig",
    "SamplerConfig", "TextConfig", "TrainingConfig", "check",
    "apply_overrides", "configs_dir", "from_dict", "load_config", "load_dataclass", "load_preset",
    "parse_override", "read_yaml", "save_config", "upgrade_stored",
]


# ----------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with errors that name the key.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an int", float: "a float", bool: "a bool", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, _type_name(tp), value)
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, _type_name(tp), value)
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                if err.key != key:  # an error inside a nested value: report it as it is
                    raise
        raise ConfigError(key, _type_name(tp), value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, _type_name(tp), value)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, "a mapping", value)
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(key, "null", value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "a bool (true/false)", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "an int", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, "a float", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, "a float", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, "a string", value)
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}" if prefix else k)
    renamed = getattr(cls, "renamed_keys", {})
    for key in data:
        if key in renamed and key not in names:
            raise ConfigError(dotted(key), f"'{dotted(renamed[key])}' instead (the key was renamed)",
                              f"the old key '{key}'")
        if key not in names:
            raise ConfigError(dotted(key), "one of " + ", ".join(sorted(names)), f"unknown key '{key}'")
    kwargs = {key: _coerce(value, hints[key], dotted(key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by __post_init__ with a key relative to this section
        raise ConfigError(dotted(err.key), err.expected, err.found) from None


def from_dict(data: dict[str, Any], cls: type = Config, source: str | None = None) -> Any:
    """Build `cls` from a nested dict; errors name `source` (a file) and the dotted key."""
    try:
        return _build(cls, data)
    except ConfigError as err:
        raise ConfigError(err.key, err.expected, err.found, source) from None


def upgrade_stored(data: dict[str, Any], cls: type = Config) -> dict[str, Any]:
    """A config dict written by an earlier version (a checkpoint's config.yaml, an export's
    metadata) with its renamed keys moved to their new names; a user's file gets an error instead."""
    renamed = getattr(cls, "renamed_keys", {})
    upgraded = {}
    for key, value in data.items():
        new = renamed.get(key)
        upgraded[new if new and new not in data else key] = value  # both present: from_dict refuses
    return upgraded


# ----------------------------------------------------------------------------------------------
# YAML files, `base:` inheritance and dotted overrides.

def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving its optional `base:` (relative to the file) recursively."""
    path = path.resolve()
    if path in seen:
        raise ConfigError("base", "a chain of files without cycles", " -> ".join(map(str, seen + (path,))),
                          str(path))
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("<file>", "valid YAML", str(err).splitlines()[0], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("<top level>", "a mapping", type(data).__name__, str(path))
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", "a path string", base, str(path))
    return _deep_merge(read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override of the form section.key=value", text, "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key, "a dotted key such as optim.lr", text, "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with each dotted override applied (sections are created as needed)."""
    data = _deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "a section", child, "--set")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_dataclass(path: str | Path, cls: type, overrides: list[str] | None = None) -> Any:
    """Read a YAML file (with `base:`) into dataclass `cls`, after dotted overrides; validate."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(data, cls, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a training config (with `base:` inheritance), apply dotted overrides, validate.

    A config that sets no `run_dir` runs in `runs/<file name without .yaml>`.
    """
    path = Path(path)
    data = apply_overrides(read_yaml(path), list(overrides or []))
    if data.get("run_dir") is None:
        data["run_dir"] = f"runs/{path.stem}"
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(data, Config, source)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config` reads it back identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)


def configs_dir() -> Path:
    """The repository's `configs/` folder of named presets."""
    return Path(__file__).resolve().parent.parent / "configs"


def load_preset(name: str, overrides: list[str] | None = None) -> Config:
    """Load a named preset such as `sr256-400m` from `configs/`."""
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir().glob("*.yaml"))
        raise FileNotFoundError(f"unknown preset '{name}'; known presets: {', '.join(known)}")
    return load_config(path, overrides)
