"""The user's mistakes, as one kind of exception and one collector of `file: field: got X, allowed Y` lines.

A leaf module: every stage raises UserError (exit 1, no traceback) and validates with Problems.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

LISTED_MAX = 50  # problems printed in one message; the rest are counted (500,000 lines help no one)
NAME_MAX = 100  # a record's file name adds its mode, a time stamp and a suffix: well under 255 bytes in all
_NAME = re.compile(r"[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]*")
SAFE_NAME = (f"a name of letters, digits and . _ - + = @ (not starting with a dot, no '..', "
             f"at most {NAME_MAX} characters)")


class UserError(Exception):
    """A mistake in the user's input: printed as a message with exit code 1, never a traceback."""


def type_name(kind: type) -> str:
    """'an int', 'a float': how error messages name an allowed type."""
    return {"int": "an int", "float": "a number", "bool": "a bool (true/false)", "str": "a string"}.get(
        kind.__name__, f"a {kind.__name__}")


def is_safe_name(value: Any) -> bool:
    """Whether `value` can be one part of a file name (a run label, a scenario or device name): a separator,
    NUL, a leading dot or '..' would put a record or a report outside its folder, or hide it."""
    return (isinstance(value, str) and len(value) <= NAME_MAX and _NAME.fullmatch(value) is not None
            and ".." not in value)


def one_of(value: Any, allowed: Any) -> bool:
    """`value in allowed` for a string key: a list or table (unhashable) in a scenario is simply not one."""
    return isinstance(value, str) and value in allowed


def shown(value: Any, width: int = 80) -> str:
    """repr(value), cut to `width` characters with its full length said: a 400-digit number or a pasted file
    in a scenario would otherwise fill the terminal."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width - 20]}... ({len(text):,} characters)"


def listed(lines: list[str], separator: str = "\n") -> str:
    """The first LISTED_MAX lines joined, and how many more there are."""
    more = f"{separator}... and {len(lines) - LISTED_MAX:,} more" if len(lines) > LISTED_MAX else ""
    return separator.join(lines[:LISTED_MAX]) + more


class Problems:
    """Collects `file: field: got X, allowed Y` lines so the user sees them all at once."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, list[str]()

    def add(self, where: str, got: Any, allowed: str) -> None:
        self.lines.append(f"{self.path}: {where}: got {shown(got)}, allowed {allowed}")

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


NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
"""Loggers that speak on every command and say nothing about a run: peft imports torchao, whose CUDA-only extensions
fail to load on a CPU build with a warning each, and torchao's enum registrations make torch warn."""


def quiet_noisy_loggers() -> None:
    """Raise NOISY_LOGGERS to ERROR; called where a command or a run's process starts, before torchao loads."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
