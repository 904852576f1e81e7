"""Where commands print: one console shape for all, and notes on stderr that do not mix with piped output.

Imported first by every command module, so it also quiets the loggers that speak on every command (errors.py)."""

from __future__ import annotations

import sys

from rich.console import Console

from galore_bench.errors import quiet_noisy_loggers

quiet_noisy_loggers()


def console() -> Console:
    """The terminal's width, or 160 columns when piped, so a wide table keeps its columns in a log."""
    return Console(width=None if sys.stdout.isatty() else 160)


def note(text: str) -> None:
    """A remark that does not stop the command (an option with no effect here)."""
    print(f"galore-bench: note: {text}", file=sys.stderr)
