"""Budget files: a TOML of limits on result records, parsed into rules (`galore-bench check`; budgets.py checks them).

    [[budget]]
    scenario = "7b_4090"              # a shipped name, or your own .toml (a path relative to this file)
    run = "galore8bit-layerwise"      # or "*" for every run of the scenario
    peak = "22 GiB"                   # also any memory category: optimizer_states = "2 GiB", ...
    reserved = "24 GiB"               # what the GPU reserves: measured on CUDA, else the allocator model's
    allocated = "23 GiB"              # the allocator's block peak (torch.cuda.max_memory_allocated, or the model's)
    device_total = "24 GiB"           # what nvidia-smi shows: NVML on a GPU, else reserved + a published estimate
    tgs_min = 100.0
    perplexity_max = 40.0
    mode = "simulate"                 # optional: only records of this mode count (default: any)
    baseline = "results/baseline"     # a folder of records or one record file
    grow_max = "2%"                   # peak and every category: at most baseline * (1 + 2%)

A bare grow_max number is a fraction (0.02 = 2%) and is refused above 1: `grow_max = 5` is far likelier a
mistyped "5%" than a wish to allow 500%, which is written "500%". Every limit is a finite number >= 0.

In your own tests: `assert_memory_budget(record, peak="22 GiB", gradients="1 GiB")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from galore_bench.errors import UserError, listed, shown
from galore_bench.readings import READINGS
from galore_bench.spec.scenario import load_scenario, shipped_scenarios
from galore_bench.units import ALLOWED_UNITS, CATEGORIES, format_bytes, parse_bytes

GROW_FIELDS = ("peak", *CATEGORIES)  # what grow_max holds to the baseline
MEMORY_FIELDS = (*GROW_FIELDS, *READINGS)  # a reading: allocated, reserved or device_total (galore_bench.readings)
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


def value_text(field: str, value: float | None) -> str:
    """A limit or a measured value as the verdicts print it: bytes for memory fields."""
    if value is None:
        return "-"
    return format_bytes(value) if field in MEMORY_FIELDS else f"{value:.4g}"


LARGEST = 2.0**63  # no byte count, throughput or loss a record holds reaches it; 10**400 overflows a float


def _number(value: Any) -> float:
    """A finite number in [0, 2**63]; TypeError or ValueError otherwise (NaN passes every comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    if isinstance(value, int) and abs(value) > LARGEST or not 0 <= float(value) <= LARGEST:
        raise ValueError(value)
    return float(value)


def _size(value: Any) -> float:
    return _number(float(parse_bytes(value)))


def _grow(value: Any) -> float:
    """grow_max as a fraction: "2%" -> 0.02, or a bare fraction 0.02 (refused above 1, see the docstring)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return _number(float(value.strip()[:-1])) / 100
    if _number(value) > 1:
        raise ValueError(value)
    return float(value)


def load_budgets(path: Path | str) -> list[Rule]:
    """Parse and validate a budgets file; every problem is reported at once as a UserError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # TOMLDecodeError, UnicodeDecodeError, an int of 4300+ digits
        raise UserError(f"{path}: not a readable budgets TOML file ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not a budgets file: nested too deeply to read") from None
    problems: list[str] = []

    def bad(where: str, got: Any, allowed: str) -> None:
        problems.append(f"{path}: {where}: got {shown(got)}, allowed {allowed}")

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
                limits[key] = _size(value) if key in MEMORY_FIELDS else _number(value)
            except (TypeError, ValueError):
                bad(f"{at}.{key}", value, f"a size: a number >= 0 and a unit ({ALLOWED_UNITS}), below 2**63 bytes"
                    if key in MEMORY_FIELDS else "a finite number >= 0")
                continue
            if key in ("peak", *READINGS) and limits[key] <= 0:  # a category may be held to 0 B (LOMO's gradients)
                bad(f"{at}.{key}", value, "a size > 0 (no run fits in 0 bytes)")
        grow = baseline = None
        if "grow_max" in table:
            try:
                grow = _grow(table["grow_max"])
            except (TypeError, ValueError):
                bad(f"{at}.grow_max", table["grow_max"], "a finite percentage >= 0 such as \"2%\", or a "
                    "fraction from 0 to 1 such as 0.02 (write \"500%\" for 5: a bare 5 is likelier a mistyped 5%)")
            if "baseline" not in table:
                bad(f"{at}.grow_max", table["grow_max"], "only with a baseline = \"folder or record\"")
        if "baseline" in table:
            baseline = Path(str(table["baseline"]))
            if not _exists(baseline) and _exists(path.parent / baseline):
                baseline = path.parent / baseline
            if not _exists(baseline):
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
        raise UserError(f"{len(problems)} problem(s) in budgets file:\n  " + listed(problems, "\n  "))
    return rules


def _exists(path: Path) -> bool:
    """Path.exists, False for a name the system refuses (too long, a NUL): it names no file either way."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _scenario_file(scenario: Any, budgets_path: Path, known: list[str]) -> str | None:
    """A shipped scenario's name, or a .toml path (as given, else beside the budgets file); None if neither."""
    if scenario in known:
        return str(scenario)
    if isinstance(scenario, str) and scenario.endswith(".toml"):
        for candidate in (Path(scenario), budgets_path.parent / scenario):
            if _exists(candidate) and candidate.is_file():
                return str(candidate)
    return None
