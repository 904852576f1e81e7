"""`galore-bench check`: records against a budgets file, one verdict per limit; exit 1 on a violation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from galore_bench.cli.output import console as default_console
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import DEFAULT_RESULTS

if TYPE_CHECKING:
    from rich.table import Table

    from galore_bench.check.budgets import Verdict

NAME = "check"
HELP = "check result records against a budgets file (memory, speed, quality); exit 1 on a violation"
DESCRIPTION = (
    "Check the newest ok record of each (scenario, run) against the limits in a budgets TOML "
    "([[budget]] tables: peak, memory categories, tgs_min, perplexity_max, baseline + grow_max)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", type=Path, required=True, help="the budgets .toml file")
    parser.add_argument("results", nargs="*", type=Path, help="record files or folders (default: results/)")
    parser.add_argument(
        "--run",
        action="store_true",
        help="first run the runs the rules name, each in its rule's mode (simulate by default), "
        "into the (first) results folder",
    )


def from_args(args: argparse.Namespace) -> int:
    return run(args.budgets, args.results or [DEFAULT_RESULTS], run_scenarios=args.run)


def run(
    budgets: Path, results: list[Path], *, run_scenarios: bool = False, console: Console | None = None
) -> int:
    """Optionally run the scenarios the rules name, then print the verdict table; 1 on any violation."""
    from galore_bench import store
    from galore_bench.check.budgets import evaluate, load_budgets
    from galore_bench.run.sweep import run_scenario

    console = console or default_console()
    rules = load_budgets(budgets)
    if run_scenarios:
        for file, mode in dict.fromkeys((r.scenario_file, r.mode or "simulate") for r in rules):
            named = [r.run for r in rules if (r.scenario_file, r.mode or "simulate") == (file, mode)]
            # only the runs a rule names, in its mode
            run_scenario(load_scenario(file), out=results[0], mode=mode, only=",".join(dict.fromkeys(named)))
    records = store.load_all([p for p in results if p.exists() or not run_scenarios])
    verdicts = evaluate(rules, records)
    modes = {path: f"{rec['mode']}, {rec['device']}" for path, rec in records}
    console.print(verdict_table(verdicts, modes, f"budgets: {budgets}"))
    failed = [v for v in verdicts if not v.ok and not v.missing]
    unchecked = [v for v in verdicts if v.missing]
    for v in failed:
        console.print(Text(v.message, style="red"), highlight=False, soft_wrap=True)
    for v in {v.message: v for v in unchecked}.values():  # one line per (scenario, run), not one per limit
        where = f" under {', '.join(map(str, results))}" if v.missing == "record" else ""
        console.print(Text(v.message + where, style="red"), highlight=False, soft_wrap=True)
    console.print(
        f"{sum(v.ok for v in verdicts)} ok, {len(failed)} violation(s)"
        + (f", {len(unchecked)} rule(s) without a record or baseline" if unchecked else "")
    )
    return 1 if failed or unchecked else 0


def verdict_table(verdicts: list[Verdict], modes: dict[Path, str], title: str) -> Table:
    """One row per limit: the value, the limit, the verdict, and the mode and device of its record."""
    from rich.table import Table

    from galore_bench.check.rules import MEMORY_FIELDS, value_text

    table = Table(title=Text(title))  # a file name, a record's mode and device: text, never markup
    for column in ("rule", "value", "limit", "verdict", "record"):
        table.add_column(column, justify="right" if column in ("value", "limit") else "left")
    for v in verdicts:
        field = v.rule.field if v.rule.field in MEMORY_FIELDS else "x"
        verdict = "ok" if v.ok else f"no {v.missing}" if v.missing else "FAIL"
        table.add_row(
            Text(v.rule.name),
            value_text(field, v.value),
            value_text(field, v.limit),
            Text(verdict, style="green" if v.ok else "red"),
            Text(modes.get(v.record, "-") if v.record else "-"),
        )
    return table
