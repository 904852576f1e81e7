"""Memory / speed / quality budgets: a TOML of limits checked against result records (`galore-bench check`).

    [[budget]]
    scenario = "7b_4090"              # a shipped name, or your own .toml (a path relative to this file)
    run = "galore8bit-layerwise"      # or "*" for every run of the scenario
    peak = "22 GiB"                   # also any memory category: optimizer_states = "2 GiB", ...
    reserved = "24 GiB"               # what the GPU reserves: measured on CUDA, else the allocator model's
    tgs_min = 100.0
    perplexity_max = 40.0
    mode = "simulate"                 # optional: only records of this mode count (default: any)
    baseline = "results/baseline"     # a folder of records or one record file
    grow_max = "2%"                   # peak and every category: at most baseline * (1 + 2%)

In your own tests: `assert_memory_budget(record, peak="22 GiB", gradients="1 GiB")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.record import RunRecord, breakdown_of, memory_value, reserved_of
from galore_bench.spec.scenario import load_scenario, shipped_scenarios
from galore_bench.units import ALLOWED_UNITS, CATEGORIES, format_bytes, parse_bytes

GROW_FIELDS = ("peak", *CATEGORIES)  # what grow_max holds to the baseline
MEMORY_FIELDS = (*GROW_FIELDS, "reserved")
# budget key -> (record section, record key, "max"/"min")
SCALAR_FIELDS = {
    "tgs_min": ("throughput", "tgs", "min"),
    "tokens_per_second_min": ("throughput", "tokens_per_second", "min"),
    "perplexity_max": ("quality", "perplexity", "max"),
    "final_loss_max": ("quality", "final_loss", "max"),
}
KEYS = ("scenario", "run", "mode", *MEMORY_FIELDS, *SCALAR_FIELDS, "baseline", "grow_max")
RECORD_MODES = ("estimate", "simulate", "measure")


@dataclass(frozen=True)
class Rule:
    """One limit on one field of one (scenario, run); `grow` rules take their limit from the baseline."""

    scenario: str
    run: str
    field: str                 # a MEMORY_FIELDS name or a SCALAR_FIELDS key
    limit: float | None        # bytes for memory fields; None for a pure grow rule
    grow: float | None = None  # fraction, e.g. 0.02
    baseline: Path | None = None
    source: str = ""
    mode: str | None = None    # only records of this mode count
    scenario_file: str = ""    # what load_scenario reads for `check --run`: a shipped name or a .toml path

    @property
    def name(self) -> str:
        grow = f" (grow {self.grow:.0%})" if self.grow is not None else ""
        return f"{self.scenario}/{self.run} {self.field}{grow}"


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    value: float | None
    limit: float | None
    ok: bool
    message: str
    record: Path | None = None
    missing: str = ""  # "record" or "baseline" when the rule could not be checked for want of one


def value_text(field: str, value: float | None) -> str:
    """A limit or a measured value as the verdicts print it: bytes for memory fields."""
    if value is None:
        return "-"
    return format_bytes(value) if field in MEMORY_FIELDS else f"{value:.4g}"


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


def load_budgets(path: Path | str) -> list[Rule]:
    """Parse and validate a budgets file; every problem is reported at once as a UserError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: not a readable budgets TOML file ({exc})") from None
    problems: list[str] = []

    def bad(where: str, got: Any, allowed: str) -> None:
        problems.append(f"{path}: {where}: got {got!r}, allowed {allowed}")

    for key in (k for k in raw if k != "budget"):
        bad(key, key, "[[budget]] tables only")
    tables = raw.get("budget", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        bad("budget", tables, "[[budget]] tables")
        tables = []
    elif not tables:
        bad("budget", "no [[budget]] table", "at least one (a file that checks nothing would always pass)")
    known = shipped_scenarios()
    rules: list[Rule] = []
    for i, table in enumerate(tables):
        at = f"budget[{i}]"
        for key in table:
            if key not in KEYS:
                bad(f"{at}.{key}", key, "one of " + ", ".join(KEYS))
        scenario, run = table.get("scenario"), table.get("run", "*")
        labels: list[str] = []
        scenario_file = _scenario_file(scenario, path, known)
        if scenario_file is None:
            bad(f"{at}.scenario", scenario, "one of " + ", ".join(known) + ", or a scenario .toml file (a path "
                "relative to this budgets file)")
        else:
            loaded = load_scenario(scenario_file)
            scenario, labels = loaded.name, [r.label for r in loaded.runs]
            if run != "*" and run not in labels:
                bad(f"{at}.run", run, "'*' or one of " + ", ".join(labels))
        mode = table.get("mode")
        if mode is not None and mode not in RECORD_MODES:
            bad(f"{at}.mode", mode, "one of " + ", ".join(RECORD_MODES))
        limits: dict[str, float] = {}
        for key in (k for k in (*MEMORY_FIELDS, *SCALAR_FIELDS) if k in table):
            value = table[key]
            try:
                limits[key] = float(parse_bytes(value) if key in MEMORY_FIELDS else _number(value))
            except (TypeError, ValueError):
                bad(f"{at}.{key}", value, f"a size: a number and a unit ({ALLOWED_UNITS})"
                    if key in MEMORY_FIELDS else "a number")
                continue
            if key in ("peak", "reserved") and limits[key] <= 0:  # a category may be held to 0 B (LOMO's gradients)
                bad(f"{at}.{key}", value, "a size > 0 (no run fits in 0 bytes)")
        grow = baseline = None
        if "grow_max" in table:
            text = str(table["grow_max"]).strip()
            try:
                if isinstance(table["grow_max"], bool):
                    raise TypeError(table["grow_max"])
                grow = float(text[:-1]) / 100 if text.endswith("%") else float(table["grow_max"])
                if grow < 0:
                    raise ValueError(grow)
            except (TypeError, ValueError):
                bad(f"{at}.grow_max", table["grow_max"],
                    "a percentage >= 0 such as \"2%\", or a fraction >= 0 such as 0.02")
            if "baseline" not in table:
                bad(f"{at}.grow_max", table["grow_max"], "only with a baseline = \"folder or record\"")
        if "baseline" in table:
            baseline = Path(str(table["baseline"]))
            if not baseline.exists() and (path.parent / baseline).exists():
                baseline = path.parent / baseline
            if not baseline.exists():
                bad(f"{at}.baseline", str(table["baseline"]), "an existing record file or results folder")
        if not any(k in table for k in (*MEMORY_FIELDS, *SCALAR_FIELDS, "grow_max")):
            bad(at, sorted(table), "at least one limit: " + ", ".join((*MEMORY_FIELDS, *SCALAR_FIELDS, "grow_max")))
        for label in (labels if run == "*" else [run]):
            src = f"{path}:{at}"
            for fld, limit in limits.items():
                rules.append(Rule(scenario, label, fld, limit, None, baseline, src, mode, scenario_file or ""))
            if grow is not None:  # beside any absolute limit: both are checked
                for fld in GROW_FIELDS:
                    rules.append(Rule(scenario, label, fld, None, grow, baseline, src, mode, scenario_file or ""))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in budgets file:\n  " + "\n  ".join(problems))
    return rules


def _scenario_file(scenario: Any, budgets_path: Path, known: list[str]) -> str | None:
    """A shipped scenario's name, or a .toml path (as given, else beside the budgets file); None if neither."""
    if scenario in known:
        return str(scenario)
    if isinstance(scenario, str) and scenario.endswith(".toml"):
        for candidate in (Path(scenario), budgets_path.parent / scenario):
            if candidate.is_file():
                return str(candidate)
    return None


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
        if rule.field == "reserved" and model.get("out_of_memory"):  # its reserved peak stopped at the cap
            verdicts.append(Verdict(rule, None, limit, False, f"{who}: reserved: the caching-allocator model runs "
                                                              f"out of memory ({model['out_of_memory']})", path))
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
        if fld == "reserved":  # only a record says what the GPU reserves (its reading or the allocator model's)
            is_record = isinstance(record_or_breakdown, dict) and "memory" in record_or_breakdown
            value = reserved_of(record_or_breakdown)[0] if is_record else None
        else:
            value = value_peak if fld == "peak" else breakdown.get(fld)
        msg = check_value(name, fld, value, bytes_limit, "max", breakdown, base)
        if msg:
            failures.append(msg)
    if failures:
        raise AssertionError("\n".join(failures))
