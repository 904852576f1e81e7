"""Older records brought to the current schema: each version step fills only what the older record itself held
(null where it never knew a value), so readers of the current TypedDicts index directly."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from galore_bench import readings as readings_of_engines
from galore_bench.record import SCHEMA_VERSION

# -- version 1 -> 2 -----------------------------------------------------------------------------------
# What version 1 records sometimes lacked (written before the field existed, or by a run that failed first).
_V1_TOP: dict[str, Any] = {"traceback": None, "cross_check_errors": {}, "distributed": None,
                           "wall_seconds": None, "host_peak_rss_bytes": None}
_V1_SECTIONS: dict[str, dict[str, Any]] = {
    "memory": {"category_peaks": None, "source": None, "steady_state_from_step": None, "estimate": None,
               "allocator_model": None, "cuda": None},  # readings: version 3 (upgrade_2_to_3)
    "method": {"implementation": None},
    "quality": {"final_loss": None, "perplexity": None, "losses": [], "data": None},
    "throughput": {"tokens_per_second": None, "tgs": None, "mfu": None},
    "env": {"python": None, "platform": None, "packages": {}, "git_commit": None, "git_dirty": None},
    "budget": {"bytes": None, "text": None, "fits": None},
}


def upgrade_1_to_2(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill every field version 1 could lack with null (its empty value), so version 2 readers index directly.
    Nothing is derived or guessed: a v1 record that never knew a value says so with null."""
    record: dict[str, Any] = {**raw, "schema_version": 2}
    for key, empty in _V1_TOP.items():
        record.setdefault(key, _fresh(empty))
    record.setdefault("env", {})
    for section, fields in _V1_SECTIONS.items():
        if isinstance(record.get(section), dict):
            record[section] = {**{k: _fresh(v) for k, v in fields.items()}, **record[section]}
    return record


def _fresh(value: Any) -> Any:
    return type(value)() if isinstance(value, (dict, list)) else value


# -- version 2 -> 3 -----------------------------------------------------------------------------------
def upgrade_2_to_3(raw: dict[str, Any]) -> dict[str, Any]:
    """Add `memory.readings` from what the version 2 record itself holds (the CUDA allocator's counters, the
    allocator model's replay, the estimate's or CPU tracker's peak), each source saying it came from a v2 record;
    a figure the record never held stays null."""
    record = {**raw, "schema_version": 3}
    memory = record.get("memory")
    if isinstance(memory, dict) and "readings" not in memory:
        found = _v2_readings(record, memory)
        for value in (found or {}).values():
            value["source"] += " (from a schema 2 record: peak over every step)"
        record["memory"] = {**memory, "readings": found}
    return record


def _v2_readings(record: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any] | None:
    peak = memory.get("peak_bytes")
    if record.get("distributed") is not None:
        return None
    if isinstance(cuda := memory.get("cuda"), dict) and cuda.get("allocated_bytes"):
        return readings_of_engines.measured_cuda(cuda)
    model = memory.get("allocator_model")
    if isinstance(model, dict) and isinstance(model.get("peak_allocated_bytes"), int):
        return readings_of_engines.simulated(model)
    if isinstance(peak, int) and record.get("mode") == "estimate":
        return readings_of_engines.estimated(peak)
    if isinstance(peak, int) and record.get("mode") == "measure":
        return readings_of_engines.measured_cpu(peak)
    return None


UPGRADES: dict[int, Callable[[dict[str, Any]], Any]] = {1: upgrade_1_to_2, 2: upgrade_2_to_3}  # n -> n + 1


def upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """The record at SCHEMA_VERSION; ValueError('schema_version: ...') for a version this code cannot read."""
    version = raw.get("schema_version")
    known = isinstance(version, int) and not isinstance(version, bool)
    if not known or version != SCHEMA_VERSION and version not in UPGRADES:
        newer = isinstance(version, int) and known and version > SCHEMA_VERSION
        hint = "update galore-bench" if newer else "re-run the scenario (no upgrade is known from it)"
        raise ValueError(f"schema_version: got {version!r}, allowed {SCHEMA_VERSION} (the record format this "
                         f"galore-bench reads, upgrading from {', '.join(map(str, UPGRADES))}): {hint}")
    while raw["schema_version"] != SCHEMA_VERSION:
        raw = dict(UPGRADES[raw["schema_version"]](raw))
    return raw
