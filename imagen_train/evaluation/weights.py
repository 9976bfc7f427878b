"""Locating metric weights on local disk; nothing here (or anywhere in evaluation/) downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class MissingWeightsError(FileNotFoundError):
    """Metric weights are not configured or not found; the message names the setting and the fix."""


def require_file(path: Optional[str], setting: str, how_to_get: str, folder: bool = False) -> Path:
    """Return `path` as a Path if it exists (a file, or a folder when `folder`), else explain."""
    kind = "folder" if folder else "file"
    if not path:
        raise MissingWeightsError(f"{setting} is not set: it must name a local {kind} with {how_to_get}. "
                                  f"Set it in the config or with --set {setting}=PATH. "
                                  "Nothing is downloaded automatically.")
    p = Path(path).expanduser()
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        raise MissingWeightsError(f"{setting}={path}: no such {kind}. It must hold {how_to_get}. "
                                  "Nothing is downloaded automatically.")
    return p
