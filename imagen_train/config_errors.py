"""The error every config check raises, and the check itself (shared by the schema modules)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names file and key."""

    def __init__(self, key: str, expected: str, found: Any, source: str | None = None):
        self.key, self.expected, self.found, self.source = key, expected, found, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': expected {expected}, found {found!r}")


def check(ok: bool, key: str, expected: str, found: Any) -> None:
    """Raise ConfigError for `key` (relative to the section) unless `ok`."""
    if not ok:
        raise ConfigError(key, expected, found)
