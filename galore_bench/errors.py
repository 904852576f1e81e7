"""The user's mistakes, as one kind of exception and one collector of `file: field: got X, allowed Y` lines.

A leaf module: every stage raises UserError (exit 1, no traceback) and validates with Problems.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the user's input: printed as a message with exit code 1, never a traceback."""


def type_name(kind: type) -> str:
    """'an int', 'a float': how error messages name an allowed type."""
    return {"int": "an int", "float": "a number", "bool": "a bool (true/false)", "str": "a string"}.get(
        kind.__name__, f"a {kind.__name__}")


class Problems:
    """Collects `file: field: got X, allowed Y` lines so the user sees them all at once."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, list[str]()

    def add(self, where: str, got: Any, allowed: str) -> None:
        self.lines.append(f"{self.path}: {where}: got {got!r}, allowed {allowed}")

    def unknown_keys(self, where: str, table: dict[str, Any], allowed: list[str]) -> None:
        for key in table:
            if key not in allowed:
                self.add(f"{where}{key}", key, "one of " + ", ".join(allowed))

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.add(key, value, "a table")
            return {}
        return value
