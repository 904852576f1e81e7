"""Result records: one JSON file per run, schema-versioned, written atomically, never overwritten."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from galore_bench.errors import UserError

SCHEMA_VERSION = 1
DEFAULT_RESULTS = Path("results")
TRACKED_PACKAGES = ("galore-bench", "torch", "transformers", "bitsandbytes", "peft", "galore-torch", "lomo-optim")


def environment() -> dict[str, Any]:
    """Versions and commit: enough to tell two records' provenance apart."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = _git("rev-parse", "--short", "HEAD")
    # the code that ran differs from that commit when the package or the scenarios have uncommitted changes
    dirty = None if commit is None else _git("status", "--porcelain", "--", ":/galore_bench", ":/scenarios") != ""
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "git_dirty": dirty}


def _git(*args: str) -> str | None:
    """A git command's output in this package's checkout; None outside one (an installed wheel) or on failure."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def empty_record(scenario: dict[str, Any], run: dict[str, Any], mode: str, device: str) -> dict[str, Any]:
    """The record skeleton: every field present, null where not measured."""
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario["name"],
        "run": run["label"],
        "method": {"name": run["method"], **run["options"]},
        "mode": mode,
        "device": device,
        "status": "error",
        "error": None,
        "model": {"name": scenario["model_name"], "parameters": None, "trainable_parameters": None,
                  "shape": scenario["model"]},
        "train": scenario["train"],
        "budget": {"bytes": scenario["budget_bytes"], "text": scenario["budget_text"], "fits": None},
        "memory": {"peak_bytes": None, "breakdown": None},
        "throughput": {"tokens_per_second": None, "tgs": None, "mfu": None},
        "quality": {"final_loss": None, "perplexity": None, "losses": []},
        "env": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def record_path(out_dir: Path, record: dict[str, Any]) -> Path:
    stamp = record["created"].replace(":", "").replace("-", "")
    return out_dir / record["device"] / record["scenario"] / f"{record['run']}.{record['mode']}.{stamp}.json"


def write_record(record: dict[str, Any], out_dir: Path) -> Path:
    """Write to a temporary file, then hard-link it into place: atomic, and an existing file is never replaced."""
    target = record_path(out_dir, record)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=False)
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


def load_record(path: Path) -> dict[str, Any]:
    """Read one record; a record of another schema version is a clear error, not a KeyError later."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable result record ({exc})") from None
    version = record.get("schema_version") if isinstance(record, dict) else None
    if version != SCHEMA_VERSION or isinstance(version, bool):
        hint = "update galore-bench" if isinstance(version, int) and version > SCHEMA_VERSION else "re-run the scenario"
        raise UserError(f"{path}: schema_version: got {version!r}, allowed {SCHEMA_VERSION} (the record format this "
                        f"galore-bench reads): {hint}")
    return record


def is_foreign_json(path: Path) -> bool:
    """A readable JSON file that is plainly not a record (none of a record's keys): a folder scan skips it. One
    with some of them (an old or damaged record) is read, and its problem reported, never skipped quietly."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # unreadable: reported as a damaged record where it is read
    return not (isinstance(data, dict) and {"schema_version", "scenario", "run", "status", "memory"} & data.keys())


def reserved_of(record: dict[str, Any]) -> tuple[int | None, str | None]:
    """What the GPU reserves for this run, and where that comes from: the CUDA allocator's reading when
    measured, the caching-allocator model's when simulated ("... OOM at the budget" when it ran out)."""
    memory = record.get("memory") or {}
    if (cuda := memory.get("cuda")) and cuda.get("reserved_bytes"):
        return cuda["reserved_bytes"], "measured"
    if model := memory.get("allocator_model"):
        oom = model.get("out_of_memory")
        return model["peak_reserved_bytes"], "allocator model: OOM at the budget" if oom else "allocator model"
    return None, None


def find_records(paths: list[Path]) -> list[Path]:
    """Record files under the given files/folders, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*.json") if not p.name.startswith(".tmp-")):
                if is_foreign_json(file):  # a summary or notes file beside the records
                    print(f"galore-bench: note: skipped {file}: not a result record (none of its keys)",
                          file=sys.stderr)
                else:
                    found.append(file)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return found
