"""The record store: the only module that writes record files (atomically, never over another) and reads them.

A results folder holds `<device>/<scenario>/<run>.<mode>.<stamp>.json`; files are found by name and folder,
with no index file. `newest` is the one rule for "which record stands for a run" (report, compare, check and
--skip-existing each pick their key and whether only ok records count).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, cast

from galore_bench.errors import SAFE_NAME, UserError, is_safe_name, listed, shown
from galore_bench.record import SCHEMA_VERSION, RunRecord, problems_in
from galore_bench.record_upgrade import upgraded

DEFAULT_RESULTS = Path("results")
# what every reader needs; a JSON file with none of them is not a record at all
REQUIRED = ("scenario", "run", "method", "mode", "device", "status", "model", "train", "budget", "memory")
# a JSON file with none of these is not a record at all (a summary or notes beside them), the one rule for
# both a folder scan (skips it with a note) and a named file (refused as "not a record")
MARKERS = frozenset({"schema_version", "scenario", "run", "status", "memory"})
Stored = tuple[Path, RunRecord]


def record_path(out_dir: Path, record: RunRecord) -> Path:
    stamp = record["created"].replace(":", "").replace("-", "")
    return out_dir / record["device"] / record["scenario"] / f"{record['run']}.{record['mode']}.{stamp}.json"


def inside(folder: Path, name: Path | str) -> Path:
    """folder / name, refused (UserError) when it resolves outside the folder: a name taken from a scenario
    or a record (validated where read) never places a file elsewhere, by '..', a root or a symlink."""
    path = Path(folder) / name
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise UserError(f"{path}: refusing to write outside {folder} (a name that is a path?)")
    return path


def write(record: RunRecord, out_dir: Path) -> Path:
    """Write to a temporary file, then hard-link it into place: atomic, never over an existing file, always
    under out_dir, strict JSON (a NaN is refused, not written as the non-standard `NaN`)."""
    problems = problems_in(dict(record)) + (
        [] if record["schema_version"] == SCHEMA_VERSION else ["schema_version"]
    )
    problems += [f"{key}: got {record.get(key)!r}, allowed {SAFE_NAME}"  # they name its folder and file
                 for key in ("device", "run") if not is_safe_name(record.get(key))]
    try:
        target = inside(out_dir, record_path(Path(), record))  # before the names' own problems: where it goes
    except (TypeError, AttributeError):  # a name of the wrong type: among the problems
        pass
    if problems:  # a bug in the code that built it: every record written is one `load` reads back
        raise ValueError(f"refusing to write an incomplete record: {'; '.join(problems)}")
    text = json.dumps(record, indent=1, sort_keys=False, allow_nan=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        for attempt in range(100):
            candidate = target if attempt == 0 else target.with_name(f"{target.stem}-{attempt}.json")
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                continue
        raise OSError(f"could not find a free file name for {target}")
    finally:
        os.unlink(tmp)


def load(path: Path) -> RunRecord:
    """One record at the current schema version (older ones upgraded), or a UserError naming the file and
    what is wrong: not JSON, not a record, a version this code cannot read, or each damaged field."""
    if kind_of(Path(path)) != "file":  # a FIFO or device named *.json would block the read forever
        raise UserError(f"{path}: not a regular file (a record is a plain JSON file)")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not a result record (nested too deeply to read)") from None
    if not isinstance(raw, dict) or not MARKERS & raw.keys():
        raise UserError(f"{path}: not a galore-bench result record (no schema_version, scenario or run)")
    try:
        record = upgraded(raw)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    if missing := [key for key in REQUIRED if key not in record]:
        raise UserError(f"{path}: not a galore-bench result record (missing {', '.join(missing)})")
    try:
        problems = problems_in(record)
    except RecursionError:  # nesting the parser took but the type walk cannot
        problems = ["nested too deeply to be a result record"]
    if problems:
        raise UserError(f"{path}: " + listed(problems, "; "))
    return cast(RunRecord, record)


def _is_foreign(path: Path) -> bool:
    """A readable JSON file that is plainly not a record (none of a record's keys): a folder scan skips it.
    One with some of them (an old or damaged record) is read and its problem reported, never skipped."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # unreadable: reported as a damaged record where it is read
    return not (isinstance(data, dict) and MARKERS & data.keys())


def kind_of(path: Path) -> str:
    """'folder', 'file' (regular), 'other' (a FIFO, a device) or 'missing'; a UserError for a name the system
    refuses (over 255 bytes, a NUL), which would otherwise be an OSError traceback."""
    try:
        return ("folder" if path.is_dir() else "file" if path.is_file() else "other" if path.exists()
                else "missing")
    except (OSError, ValueError) as exc:
        raise UserError(f"{shown(str(path), 80)}: not a usable path ({exc.__class__.__name__}: "
                        f"{getattr(exc, 'strerror', None) or exc})") from None


def find(paths: Iterable[Path]) -> list[Path]:
    """Record files under the given files/folders, in a stable order (foreign JSON in a folder is noted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        kind = kind_of(path)
        if kind == "folder":
            regular = (p for p in path.rglob("*.json") if p.is_file())  # a FIFO would block the scan
            for file in sorted(p for p in regular if not p.name.startswith(".tmp-")):
                if _is_foreign(file):  # a summary or notes file beside the records
                    print(
                        f"galore-bench: note: skipped {file}: not a result record (none of its keys)",
                        file=sys.stderr,
                    )
                else:
                    found.append(file)
        elif kind == "file":
            found.append(path)
        elif kind == "other":
            raise UserError(f"{path}: not a regular file or folder (a FIFO or device would block the read)")
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def load_all(paths: Iterable[Path]) -> list[Stored]:
    """Every record under the given files/folders, each with its file."""
    return [(file, load(file)) for file in find(paths)]


def by_run(record: RunRecord) -> tuple[str, str]:
    return record["scenario"], record["run"]


def by_run_and_mode(record: RunRecord) -> tuple[str, str, str]:
    """An engine's figures are only compared with the same engine's."""
    return record["scenario"], record["run"], record["mode"]


def by_run_mode_device(record: RunRecord) -> tuple[str, str, str, str]:
    """A report shows a simulation and a measurement, or two devices, side by side."""
    return record["scenario"], record["run"], record["mode"], record["device"]


def _written_order(path: Path) -> tuple[str, int]:
    """Of two records created in the same second, `write` named the later one `<stem>-N.json`: order by the stem,
    then by N (a plain name sort puts `x-1.json` before `x.json`)."""
    stem, dash, count = path.stem.rpartition("-")
    return (stem, int(count)) if dash and count.isdigit() else (path.stem, 0)


def newest(
    records: Iterable[Stored],
    key: Callable[[RunRecord], Hashable] = by_run,
    *,
    ok_only: bool = False,
    mode: str | None = None,
) -> dict[Any, Stored]:
    """Per key, the record created last (ties: the later file name); only status ok ones when `ok_only`,
    only one mode's when `mode` is given."""
    chosen: dict[Any, Stored] = {}
    for path, record in sorted(records, key=lambda pr: (pr[1]["created"], _written_order(pr[0]))):
        if (not ok_only or record["status"] == "ok") and mode in (None, record["mode"]):
            chosen[key(record)] = (path, record)
    return chosen


def finished(out: Path, scenario: str, run: str, mode: str) -> Path | None:
    """The newest ok record of exactly this run in this mode in a results folder (any device), so an
    interrupted sweep resumes the set it was asked for; a damaged record there is noted and run again."""
    stored: list[Stored] = []
    for file in sorted(out.glob(f"*/{glob.escape(scenario)}/{glob.escape(run)}.{glob.escape(mode)}.*.json")):
        try:
            stored.append((file, load(file)))
        except UserError as exc:  # its message starts with the file
            print(f"galore-bench: note: skipped {exc}", file=sys.stderr)
    found = newest(stored, by_run_and_mode, ok_only=True)
    return found[(scenario, run, mode)][0] if (scenario, run, mode) in found else None


def load_latest(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[Path], Counter[str]]:
    """What a report shows: the newest record per (scenario, run, mode, device), ordered by scenario and model
    size, their files, and how many older ones were left out per scenario."""
    paths = list(paths)
    stored = load_all(paths)
    if not stored:
        raise UserError(f"no result records under {', '.join(map(str, paths))}: run `galore-bench run` first")
    latest = newest(stored, by_run_mode_device)
    skipped = Counter(record["scenario"] for _, record in stored)
    skipped.subtract(record["scenario"] for _, record in latest.values())
    chosen = sorted(
        latest.values(),
        key=lambda pr: (pr[1]["scenario"], pr[1]["model"]["parameters"] or 0, pr[1]["created"]),
    )
    records = cast(
        list[dict[str, Any]], [record for _, record in chosen]
    )  # the report's tables take plain dicts
    return records, [path for path, _ in chosen], skipped
