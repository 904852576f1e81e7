"""The types of the record fields that report, compare and check read, checked when a record is read.

A hand-edited or damaged file (a string for a number, an int for an object, NaN, 10^400) is then one message
naming the file and the field, instead of an AttributeError or OverflowError deep inside a table or chart.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from galore_bench.errors import shown
from galore_bench.readings import READINGS

BIGGEST = 2**63  # no byte, token or parameter count reaches it; 10**400 would overflow every float it meets


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < BIGGEST


def _is_number(value: Any) -> bool:
    return _is_count(value) or isinstance(value, float) and math.isfinite(value)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or _is_number(v) for v in value)


def _is_parts(value: Any) -> bool:
    return isinstance(value, dict) and all(_is_number(v) for v in value.values())


def _is_candidates(value: Any) -> bool:
    """A world-size search: each candidate's strategy, world size and peak (report.gpus indexes them)."""
    return isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("strategy"), str) and _is_count(c.get("world_size"))
        and _is_count(c.get("peak_bytes")) for c in value)


Check = tuple[Callable[[Any], bool], str]
COUNT: Check = (_is_count, "an int below 2**63")
NUMBER: Check = (_is_number, "a finite number")
TEXT: Check = (lambda v: isinstance(v, str), "a string")
FLAG: Check = (lambda v: isinstance(v, bool), "true or false")
REASON: Check = (lambda v: isinstance(v, (bool, str)), "false or a string (why it ran out)")
TABLE: Check = (lambda v: isinstance(v, dict), "an object")
PARTS: Check = (_is_parts, "an object of finite numbers (bytes per category)")
NUMBERS: Check = (_is_numbers, "a list of finite numbers")
CANDIDATES: Check = (_is_candidates, "a list of objects with strategy, world_size and peak_bytes")

# field path -> (check, allowed); every one may also be null or absent, except where REQUIRED says otherwise
FIELDS: dict[tuple[str, ...], Check] = {
    ("model", "name"): TEXT, ("model", "parameters"): COUNT, ("model", "trainable_parameters"): COUNT,
    ("model", "shape"): TABLE,
    ("method", "name"): TEXT, ("method", "rank"): COUNT, ("method", "layerwise"): FLAG,
    ("train", "batch_size"): COUNT, ("train", "seq_len"): COUNT, ("train", "steps"): COUNT,
    ("train", "grad_accum"): COUNT, ("train", "dtype"): TEXT, ("train", "activation_checkpointing"): FLAG,
    ("train", "loss"): TEXT, ("train", "loss_chunk_tokens"): COUNT,
    ("budget", "bytes"): COUNT, ("budget", "text"): TEXT, ("budget", "fits"): FLAG,
    ("memory", "peak_bytes"): COUNT, ("memory", "breakdown"): PARTS, ("memory", "category_peaks"): PARTS,
    ("memory", "allocator_model"): TABLE, ("memory", "allocator_model", "peak_reserved_bytes"): COUNT,
    ("memory", "allocator_model", "out_of_memory"): REASON,
    ("memory", "cuda"): TABLE, ("memory", "cuda", "reserved_bytes"): COUNT, ("memory", "readings"): TABLE,
    **{("memory", "readings", name): TABLE for name in READINGS},
    **{("memory", "readings", name, "bytes"): COUNT for name in READINGS},
    **{("memory", "readings", name, "source"): TEXT for name in READINGS},
    ("throughput", "tokens_per_second"): NUMBER, ("throughput", "tgs"): NUMBER, ("throughput", "mfu"): NUMBER,
    ("quality", "final_loss"): NUMBER, ("quality", "perplexity"): NUMBER, ("quality", "losses"): NUMBERS,
    ("env", "git_commit"): TEXT, ("env", "git_dirty"): FLAG, ("env", "packages"): TABLE,
    ("distributed", "world_size"): COUNT, ("distributed", "strategy"): TEXT, ("distributed", "fsdp_unit"): TEXT,
    ("distributed", "cpu_offload"): FLAG, ("distributed", "candidates"): CANDIDATES,
    ("distributed", "gpus_needed"): COUNT, ("distributed", "max_rank_peak_bytes"): COUNT,
    ("distributed", "transient_bytes"): PARTS,
}
REQUIRED = {("method", "name"), ("model", "name"), ("memory", "allocator_model", "peak_reserved_bytes")}


def _at(record: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """(whether the field's parent is an object holding it, its value)."""
    node: Any = record
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return isinstance(node, dict) and path[-1] in node, node.get(path[-1]) if isinstance(node, dict) else None


def _out_of_range(value: Any, where: str) -> list[str]:
    """Each NaN, infinity or integer beyond 2**63 anywhere in the record (json reads NaN and 10^400)."""
    if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and not (
            isinstance(value, bool) or abs(value) < BIGGEST):
        shown = value if isinstance(value, float) else f"an int of {len(str(abs(value)))} digits"
        return [f"{where}: got {shown}, allowed a finite number below 2**63 (or null)"]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [line for key, item in items
            for line in _out_of_range(item, f"{where}.{key}" if where else str(key))]


def type_problems(record: dict[str, Any]) -> list[str]:
    """'field: got X, allowed Y' for each field a reader uses that holds the wrong type or an unusable number."""
    found = _out_of_range(record, "")
    named = {line.split(": got ", 1)[0] for line in found}  # one message per field, not one per check
    for path, (ok, allowed) in FIELDS.items():
        present, value = _at(record, path)
        where = ".".join(path)
        if where in named:
            continue
        if ok is _is_parts and isinstance(value, dict):  # name the category
            found += [f"{where}.{key}: got {_short(part)}, allowed {NUMBER[1]} (bytes)"
                      for key, part in value.items() if not _is_number(part)]
        elif present and (value is not None or path in REQUIRED) and not ok(value):
            found.append(f"{where}: got {_short(value)}, allowed {allowed}")
        elif not present and path in REQUIRED and _at(record, path[:-1])[1] is not None:
            found.append(f"{where}: missing (a damaged record?)")
    return found


def _short(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= BIGGEST:
        return f"an int of {len(str(abs(value)))} digits"
    return shown(value, 60)
