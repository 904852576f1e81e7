"""`galore-bench compare A B`: what changed between two records or two results folders, and by how much.

Folders are matched run by run on (scenario, run label, mode), taking the newest ok record of each, so a rerun
after a code change compares against the run it replaces. `--fail-above PCT` turns it into a regression gate: exit 1
when the peak or any memory category grew by more than PCT%, naming what grew. cli/compare.py prints it.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.record import Record, memory_values
from galore_bench.report.table_text import csv_safe, md_text, to_markdown
from galore_bench.report.tables import as_number
from galore_bench.units import format_bytes

# quantity -> (record section, key, unit, whether a larger value is worse)
SCALARS = {"tokens/s": ("throughput", "tokens_per_second", "tokens/s", False),
           "TGS": ("throughput", "tgs", "tokens/s", False),
           "perplexity": ("quality", "perplexity", "", True)}

Side = dict[tuple[str, str, str], store.Stored]  # (scenario, run, mode) -> (file, record)


@dataclass(frozen=True)
class Delta:
    """One quantity of one matched run: A is the baseline, B the new value; delta = B - A."""

    scenario: str
    run: str
    quantity: str
    unit: str
    a: float | None
    b: float | None
    worse_if_larger: bool = True

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def percent(self) -> float | None:
        """Change relative to A; from zero it is +inf (anything new) or 0 (still nothing)."""
        a, delta = self.a, self.delta
        if a is None or delta is None:
            return None
        if a == 0:
            return 0.0 if delta == 0 else math.copysign(math.inf, delta)
        return delta / abs(a) * 100

    @property
    def is_memory(self) -> bool:
        return self.unit == "bytes"


def _side(path: Path) -> tuple[Side, bool]:
    """(scenario, run, mode) -> (file, record) for one side, and whether the side was a single file."""
    path = Path(path)
    if (kind := store.kind_of(path)) == "file":
        record = store.load(path)
        return {store.by_run_and_mode(record): (path, record)}, True
    if kind != "folder":  # a FIFO named *.json exists but is neither
        what = "not a regular file or folder" if kind == "other" else "no such file or folder"
        raise UserError(f"{path}: {what}")
    stored = store.load_all([path])
    if not stored:
        raise UserError(f"{path}: no result records in this folder")
    # the newest ok record of each run, else its newest failure (a failure gates a comparison)
    key = store.by_run_and_mode
    newest = store.newest(stored, key) | store.newest(stored, key, ok_only=True)
    if not any(record["status"] == "ok" for _, record in newest.values()):
        raise UserError(f"{path}: {len(stored)} record(s), none with status ok: nothing to compare")
    return newest, False


def match_runs(a: Path, b: Path) -> tuple[list[tuple[tuple[str, str], store.Stored, store.Stored]],
                                          list[str], list[str]]:
    """Matched (key, A, B) pairs, and the runs found on only one side; two single files always pair up."""
    side_a, file_a = _side(a)
    side_b, file_b = _side(b)
    if file_a and file_b:
        (key_a, rec_a), (key_b, rec_b) = next(iter(side_a.items())), next(iter(side_b.items()))
        key = (key_a[0] if key_a[0] == key_b[0] else f"{key_a[0]} vs {key_b[0]}",
               key_a[1] if key_a[1] == key_b[1] else f"{key_a[1]} vs {key_b[1]}")
        return [(key, rec_a, rec_b)], [], []
    ok_a = {k for k, (_, r) in side_a.items() if r["status"] == "ok"}
    common = sorted(ok_a & side_b.keys())
    modes = Counter((scenario, run) for scenario, run, _ in common)
    label = lambda k: (k[0], k[1] if modes[(k[0], k[1])] < 2 else f"{k[1]} [{k[2]}]")
    name = lambda keys: (", ".join(f"{k[0]}/{k[1]} ({k[2]})" for k in sorted(keys)[:8])
                         + (" ..." if len(keys) > 8 else ""))
    if not common:
        raise UserError(f"no common runs: {a} has {name(ok_a)}; {b} has {name(side_b)} "
                        "(runs are matched by scenario, run label and mode)")
    only_a, only_b = ok_a - side_b.keys(), {k for k, (_, r) in side_b.items() if r["status"] == "ok"} - side_a.keys()
    return ([(label(key), side_a[key], side_b[key]) for key in common],
            [f"{s}/{r} ({m})" for s, r, m in sorted(only_a)], [f"{s}/{r} ({m})" for s, r, m in sorted(only_b)])


def _memory_numbers(record: Record) -> dict[str, float | None]:
    return {name: as_number(value) for name, value in memory_values(record).items()}


def deltas(key: tuple[str, str], rec_a: Record, rec_b: Record) -> list[Delta]:
    """Peak, each category (and each category's own maximum where both records have it), throughput, perplexity."""
    mem_a, mem_b = _memory_numbers(rec_a), _memory_numbers(rec_b)
    rows = [Delta(*key, q, "bytes", mem_a[q], mem_b.get(q)) for q in mem_a if q in mem_b]
    for quantity, (section, field, unit, worse_if_larger) in SCALARS.items():
        values = [as_number(r[section][field]) for r in (rec_a, rec_b)]
        if any(v is not None for v in values):
            rows.append(Delta(*key, quantity, unit, values[0], values[1], worse_if_larger))
    return rows


def grown(rows: list[Delta], limit: float) -> list[str]:
    """A message per peak/category that grew by more than `limit` percent."""
    out = []
    for d in rows:
        if d.is_memory and d.percent is not None and d.percent > limit:
            grew = f"from 0 B to {format_bytes(d.b)}" if d.a == 0 else f"{d.percent:+.1f}%"
            out.append(f"{d.scenario}/{d.run}: {d.quantity} grew {grew} ({format_bytes(d.a)} -> {format_bytes(d.b)})"
                       f" > {limit:g}%")
    return out


def parse_percent(text: str | float) -> float:
    """'5', '5%' or 5.0 -> 5.0; anything else is a UserError naming what is allowed."""
    try:
        value = float(str(text).strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--fail-above: got {text!r}, allowed: a percentage >= 0 such as 5 or 5%")
    return value


def _text(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed and value > 0 else ""
    if unit == "bytes":
        return sign + format_bytes(value)
    return sign + (f"{value:,.1f}" if unit else f"{value:.2f}")


def _percent_text(value: float | None) -> str:
    if value is None:
        return "-"
    return ("new" if value > 0 else "gone") if math.isinf(value) else f"{value:+.2f}%"


def delta_frame(rows: list[Delta], readable: bool) -> pd.DataFrame:
    """The long table: raw numbers (csv) or text with units (markdown, console)."""
    if not readable:
        return pd.DataFrame([{"scenario": d.scenario, "run": d.run, "quantity": d.quantity, "unit": d.unit,
                              "A": d.a, "B": d.b, "delta": d.delta, "delta %": d.percent} for d in rows])
    return pd.DataFrame([{"scenario": d.scenario, "run": d.run, "quantity": d.quantity, "A": _text(d.a, d.unit),
                          "B": _text(d.b, d.unit), "delta": _text(d.delta, d.unit, signed=True),
                          "delta %": _percent_text(d.percent)} for d in rows])


def render(rows: list[Delta], fmt: str, pairs: list, only_a: list[str], only_b: list[str], a: Path, b: Path) -> str:
    """The comparison as markdown, CSV or JSON text (JSON keeps the raw numbers and the record files)."""
    if fmt == "csv":
        return csv_safe(delta_frame(rows, readable=False)).to_csv(index=False)
    files = [{"scenario": k[0], "run": k[1], "a": str(pa), "b": str(pb), "a_mode": ra["mode"], "b_mode": rb["mode"],
              "a_device": ra["device"], "b_device": rb["device"]} for k, (pa, ra), (pb, rb) in pairs]
    if fmt == "json":
        finite = lambda v: v if v is None or math.isfinite(v) else None  # JSON has no infinity: a, b tell the story
        out = {"a": str(a), "b": str(b), "runs": files, "only_a": only_a, "only_b": only_b,
               "deltas": [{**asdict(d), "delta": d.delta, "percent": finite(d.percent)} for d in rows]}
        return json.dumps(out, indent=1) + "\n"
    lines = [f"# Compare: A = {a}, B = {b}", "", "delta = B - A; delta % is relative to A", "",
             to_markdown(delta_frame(rows, readable=True)), "", "## Record files", ""]
    lines += [md_text(f"- {f['scenario']}/{f['run']}: A {f['a']} ({f['a_mode']}, {f['a_device']}); "
                      f"B {f['b']} ({f['b_mode']}, {f['b_device']})") for f in files]
    lines += [f"- only in A: {', '.join(only_a)}"] * bool(only_a) + [f"- only in B: {', '.join(only_b)}"] * bool(only_b)
    return "\n".join(lines) + "\n"


COMPARED_FIELDS = {"scenario": lambda r: r["scenario"], "run": lambda r: r["run"],
                   "model": lambda r: (r.get("model") or {}).get("name"), "method": lambda r: r["method"]["name"],
                   "mode": lambda r: r["mode"]}


def _describe(record: Record) -> str:
    return f"{record['scenario']}/{record['run']} ({(record.get('model') or {}).get('name')}, {record['mode']})"


def mismatch_note(pairs: list) -> str | None:
    """Two files pair up whatever they hold: a sentence when they are not the same run, else None."""
    if len(pairs) != 1:
        return None
    _, (_, ra), (_, rb) = pairs[0]
    differ = [what for what, get in COMPARED_FIELDS.items() if get(ra) != get(rb)]
    if not differ:
        return None
    return f"note: A is {_describe(ra)}, B is {_describe(rb)}: different {', '.join(differ)}"


def gate_failures(rows: list[Delta], pairs: list, only_a: list[str], limit: float) -> list[str]:
    """Why `--fail-above limit` fails: what grew past it, a B that is not ok, a run that B lacks."""
    not_ok = [f"{key[0]}/{key[1]}: B is {rb['status']}, not ok "
              f"({(rb.get('error') or '').splitlines()[0][:120] if rb.get('error') else '-'})"
              for key, _, (_, rb) in pairs if rb["status"] != "ok"]
    return grown(rows, limit) + not_ok + [f"{name}: no record in B" for name in only_a]
