"""Where a report's numbers come from: the records used, their commits and versions, and the papers' tables.

Its own module so that every page (render's per-scenario reports, gpus' tables) states the same provenance
without one page importing another.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def shown(path: Path) -> str:
    """A record file as the reader can find it: relative to the working folder when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def commit_of(record: dict[str, Any]) -> str | None:
    """The record's commit, marked when the code that ran had uncommitted changes (old records cannot say)."""
    env = record.get("env") or {}
    commit = env.get("git_commit")
    return f"{commit} + uncommitted changes" if commit and env.get("git_dirty") else commit


def provenance(records: list[dict[str, Any]], files: list[Path], skipped: int, paper_line: str) -> list[str]:
    """Where the numbers come from: enough to rerun them or to tell two reports apart."""

    def values(get) -> str:
        return ", ".join(sorted({str(v) for v in map(get, records)})) or "-"

    packages = lambda name: lambda r: ((r.get("env") or {}).get("packages") or {}).get(name)
    return [
        f"records used: {len(records)}" + (f" ({skipped} older duplicate(s) skipped)" if skipped else ""),
        f"mode(s): {values(lambda r: r['mode'])}; device(s): {values(lambda r: r['device'])}",
        f"git commit(s): {values(commit_of)}",
        f"galore-bench: {values(packages('galore-bench'))}; torch: {values(packages('torch'))}",
        f"record files: {', '.join(shown(f) for f in files)}",
        paper_line,
        f"generated: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        "units: GiB = 2^30 bytes, GB = 10^9 bytes; breakdowns are the composition at the peak",
    ]
