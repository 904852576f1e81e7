"""Budget verdicts: each rule of a budgets file (rules.py) held to the newest matching record, and
`assert_memory_budget` for your own tests: `assert_memory_budget(record, peak="22 GiB", gradients="1 GiB")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galore_bench import store
from galore_bench.check.rules import MEMORY_FIELDS, SCALAR_FIELDS, Rule, load_budgets, value_text
from galore_bench.readings import READINGS
from galore_bench.record import RunRecord, breakdown_of, memory_value
from galore_bench.units import format_bytes, parse_bytes

__all__ = ["Rule", "Verdict", "assert_memory_budget", "evaluate", "load_budgets", "value_text"]


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    value: float | None
    limit: float | None
    ok: bool
    message: str
    record: Path | None = None
    missing: str = ""  # "record" or "baseline" when the rule could not be checked for want of one


def diagnose(breakdown: dict[str, Any] | None, baseline: dict[str, Any] | None) -> str:
    """Which category explains the overshoot: the one that grew most vs baseline, else the largest."""
    breakdown = {k: v for k, v in (breakdown or {}).items() if isinstance(v, (int, float))}
    if not breakdown:
        return ""
    if baseline:
        growth = {k: v - baseline.get(k, 0) for k, v in breakdown.items()}
        top = max(growth, key=lambda k: growth[k])
        return f"largest growth vs baseline: {top} {'+' if growth[top] >= 0 else '-'}{format_bytes(abs(growth[top]))}"
    top = max(breakdown, key=lambda k: breakdown[k])
    return f"largest category: {top} {format_bytes(breakdown[top])}"


def check_value(who: str, field: str, value: float | None, limit: float, kind: str,
                breakdown: dict[str, Any] | None = None, base_breakdown: dict[str, Any] | None = None,
                limit_note: str = "") -> str | None:
    """None when within the limit, else the violation message."""
    if value is None:
        return f"{who}: {field} not measured in the record"
    if (value <= limit) if kind == "max" else (value >= limit):
        return None
    rel = ">" if kind == "max" else "<"
    msg = f"{who}: {field} {value_text(field, value)} {rel} budget {value_text(field, limit)}{limit_note}"
    if field in MEMORY_FIELDS:
        why = diagnose(breakdown, base_breakdown)
        return msg + f" (+{format_bytes(value - limit)}" + (f"; {why})" if why else ")")
    return msg


def _baseline_of(rule: Rule, cache: dict[tuple[Path, str | None], Any]) -> dict[str, Any] | None:
    """A grow rule's baseline record: a file is every rule's baseline, a folder gives the newest ok record of the
    rule's (scenario, run); either only of the rule's mode when it names one."""
    assert rule.baseline is not None
    key = (rule.baseline, rule.mode)
    if key not in cache:
        if rule.baseline.is_file():
            record = store.load(rule.baseline)
            cache[key] = record if rule.mode in (None, record["mode"]) else None
        else:
            stored = store.load_all([rule.baseline])
            cache[key] = store.newest(stored, store.by_run, ok_only=True, mode=rule.mode)
    found = cache[key]
    if found is None or "memory" in found:  # a record file's (or none of the mode)
        return found
    return found.get((rule.scenario, rule.run), (None, None))[1]


def evaluate(rules: list[Rule], records: list[store.Stored] | list[RunRecord]) -> list[Verdict]:
    """Check each rule against the newest ok record of its (scenario, run); records: dicts or (path, dict)."""
    pairs = [r if isinstance(r, tuple) else (Path("<record>"), r) for r in records]
    by_mode = {mode: store.newest(pairs, store.by_run, ok_only=True, mode=mode)
               for mode in dict.fromkeys(rule.mode for rule in rules)}
    baselines: dict[tuple[Path, str | None], Any] = {}
    verdicts: list[Verdict] = []
    for rule in rules:
        who, of_mode = f"{rule.scenario}/{rule.run}", f" {rule.mode}" if rule.mode else ""
        base = _baseline_of(rule, baselines) if rule.baseline is not None else None
        chosen = by_mode[rule.mode]
        if (rule.scenario, rule.run) not in chosen:
            verdicts.append(Verdict(rule, None, rule.limit, False, f"no ok{of_mode} record for {who}",
                                    missing="record"))
            continue
        path, rec = chosen[(rule.scenario, rule.run)]
        limit, note = rule.limit, ""
        model = rec["memory"]["allocator_model"] or {}
        if rule.field in READINGS and model.get("out_of_memory"):  # its peaks stopped at the cap
            verdicts.append(Verdict(rule, None, limit, False, f"{who}: {rule.field}: the caching-allocator model "
                                                              f"runs out of memory ({model['out_of_memory']})", path))
            continue
        if rule.field in SCALAR_FIELDS:
            section, key, kind = SCALAR_FIELDS[rule.field]
            value, field_name = rec[section].get(key), key  # type: ignore[literal-required]
        else:
            kind, field_name, value = "max", rule.field, memory_value(rec, rule.field)
            if rule.grow is not None:
                base_value = memory_value(base, rule.field) if base else None
                if base_value is None:
                    why = (f"no ok{of_mode} baseline record for {who} in {rule.baseline} (for grow_max)" if not base
                           else f"{who}: the baseline {rule.baseline} has no {rule.field}")
                    verdicts.append(Verdict(rule, value, None, False, why, path, "" if base else "baseline"))
                    continue
                limit = base_value * (1 + rule.grow)
                note = f" (baseline {format_bytes(base_value)} +{rule.grow:.0%})"
        assert limit is not None
        base_breakdown = breakdown_of(base) if base else None
        msg = check_value(who, field_name, value, limit, kind, breakdown_of(rec), base_breakdown, note)
        verdicts.append(Verdict(rule, value, limit, msg is None, msg or "ok", path))
    return verdicts


def _as_memory(obj: Any) -> tuple[float | None, dict[str, Any]]:
    """(peak, breakdown) from a record, a breakdown dict, a train_steps result or a MemoryTracker."""
    if isinstance(obj, dict) and "tracker" in obj:
        obj = obj["tracker"]
    if hasattr(obj, "peak") and hasattr(obj, "breakdown"):
        return float(obj.peak), dict(obj.breakdown())
    if isinstance(obj, dict) and ("memory" in obj or "peak_bytes" in obj):
        mem = obj.get("memory") or obj
        return mem.get("peak_bytes"), dict(mem.get("breakdown") or {})
    if isinstance(obj, dict):
        return float(sum(v for v in obj.values() if isinstance(v, (int, float)))), dict(obj)
    raise TypeError(f"assert_memory_budget: cannot read memory from {type(obj).__name__}")


def assert_memory_budget(record_or_breakdown: Any, peak: str | float | None = None,
                         baseline: Any = None, name: str | None = None, **category_limits: str | float) -> None:
    """Raise AssertionError (same message as `galore-bench check`) when peak or a category is over its limit.

    Limits are sizes ("22 GiB") or bytes. `baseline` (record/breakdown) names the category that grew most.
    """
    value_peak, breakdown = _as_memory(record_or_breakdown)
    base = _as_memory(baseline)[1] if baseline is not None else None
    if name is None:
        rec = record_or_breakdown if isinstance(record_or_breakdown, dict) else {}
        name = f"{rec['scenario']}/{rec['run']}" if "scenario" in rec and "run" in rec else "memory"
    limits = dict(category_limits, **({"peak": peak} if peak is not None else {}))
    failures = []
    for fld, limit in limits.items():
        if fld not in MEMORY_FIELDS:
            raise TypeError(f"assert_memory_budget: unknown field {fld!r}; allowed {', '.join(MEMORY_FIELDS)}")
        bytes_limit = float(parse_bytes(limit) if isinstance(limit, str) else limit)
        value: float | None
        if fld in READINGS:  # only a record holds the readings (allocated, reserved, device_total)
            is_record = isinstance(record_or_breakdown, dict) and "memory" in record_or_breakdown
            value = memory_value(record_or_breakdown, fld) if is_record else None
        else:
            value = value_peak if fld == "peak" else breakdown.get(fld)
        msg = check_value(name, fld, value, bytes_limit, "max", breakdown, base)
        if msg:
            failures.append(msg)
    if failures:
        raise AssertionError("\n".join(failures))
