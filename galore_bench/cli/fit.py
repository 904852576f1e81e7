"""`galore-bench fit`: does each run fit a memory budget, and what is the largest batch (or longest sequence)
that does?"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from galore_bench.cli.output import console as default_console
from galore_bench.errors import UserError
from galore_bench.spec.scenario import Scenario, load_scenario
from galore_bench.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from rich.table import Table

NAME = "fit"
HELP = "will each run fit a memory budget, and what is the largest batch (or longest sequence) that does?"
DESCRIPTION = (
    "For every run of a scenario: the estimated peak at its batch size and sequence length, whether it fits "
    "the budget, and the largest per-device batch that fits at the scenario's length (--search batch_size, "
    "the default) or the longest sequence that fits at the scenario's batch (--search seq_len; "
    "--multiple-of 256 keeps lengths to multiples of 256): bisection on the closed-form estimate. --confirm "
    "re-checks with the simulate engine at the value found and one step above, and replays that trace through "
    "the caching-allocator model: reserved bytes under the budget, and the largest value it holds."
)
LABELS = {"batch_size": "batch", "seq_len": "seq"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario", required=True, help="a shipped scenario name (see `list`) or a .toml path"
    )
    parser.add_argument(
        "--budget", default=None, help="memory per device, e.g. '24 GiB' (default: the scenario's)"
    )
    parser.add_argument(
        "--confirm", action="store_true", help="confirm with simulate (seconds per run for 7B)"
    )
    parser.add_argument(
        "--search", choices=tuple(LABELS), default="batch_size",
        help="what to maximise: the batch at the scenario's sequence length (default), or the sequence length "
        "at the scenario's batch",
    )
    parser.add_argument(
        "--markdown", action="store_true",
        help="print the table as Markdown with its provenance (command, machine, commit, date), for a report",
    )
    parser.add_argument(
        "--multiple-of", type=int, default=1, metavar="N",
        help="only values that are multiples of N (e.g. 256 for sequence lengths); default 1",
    )


def from_args(args: argparse.Namespace) -> int:
    return run(args.scenario, budget=args.budget, confirm=args.confirm, search=args.search,
               multiple_of=args.multiple_of, markdown=args.markdown)


def run(scenario: str, *, budget: str | None = None, confirm: bool = False, search: str = "batch_size",
        multiple_of: int = 1, markdown: bool = False) -> int:
    """Print the fit table of `scenario` (a shipped name or a .toml path) for `budget` (or the scenario's):
    the largest `search` value (batch_size or seq_len, a multiple of `multiple_of`) within it."""
    from galore_bench.measure.largest_batch import fit_rows

    if multiple_of < 1:
        raise UserError(f"--multiple-of: got {multiple_of}, allowed an int >= 1")

    loaded = load_scenario(scenario)
    text = budget or loaded.budget_text
    if text is None:
        raise UserError(f"{loaded.path}: device.budget: not set; give --budget such as '24 GiB'")
    try:
        budget_bytes = parse_bytes(text)
    except ValueError:
        budget_bytes = 0
    if budget_bytes <= 0:
        raise UserError(f"--budget: got {text!r}, allowed a size > 0 such as '24 GiB'")
    console = default_console()
    with console.status("estimating", spinner="dots") as status:
        rows = fit_rows(
            loaded,
            budget_bytes,
            confirm=confirm,
            tracing=lambda label, what, value: status.update(f"simulate: tracing {label} at {what} {value}"),
            search=search,
            multiple_of=multiple_of,
        )
    table = fit_table(loaded, rows, text, budget_bytes, confirm, search)
    if markdown:
        command = (f"galore-bench fit --scenario {scenario}" + (f" --budget '{budget}'" if budget else "")
                   + f" --search {search}" + (f" --multiple-of {multiple_of}" if multiple_of > 1 else "")
                   + (" --confirm" if confirm else "") + " --markdown")
        print(markdown_table(table, command), end="")
    else:
        console.print(table)
    if loaded.distributed is not None:  # the estimate is per device, unsharded
        spread = loaded.distributed
        console.print(
            f"note: one device, unsharded: {Path(loaded.path).name}'s [distributed] table "
            f"({spread.strategy}, world size {', '.join(map(str, spread.world_sizes))}) is not applied "
            f"here; `galore-bench run --scenario {scenario}` simulates the per-rank peaks",
            highlight=False,
            markup=False,
        )
    return 0


def fit_table(
    scenario: Scenario, rows: list[dict[str, Any]], budget_text: str, budget: int, confirm: bool,
    search: str = "batch_size",
) -> Table:
    """One row per run: the estimate at its settings and at the largest value that fits; with `confirm`,
    simulate's."""
    from rich.table import Table

    train = scenario.train
    fixed = f"seq {train.seq_len}" if search == "batch_size" else f"batch {train.batch_size}"
    what = "largest batch" if search == "batch_size" else "longest seq"
    table = Table(
        title=Text(f"{scenario.name}: fit in {budget_text} (estimate; {fixed}, {train.dtype}, loss {train.loss})"),
        caption="estimate = closed-form bytes; simulate = the real step traced on fake tensors; reserved = "
        "that trace through a model of the CUDA caching allocator, capped at the budget",
    )
    columns = [
        "run",
        "model",
        f"peak @ batch {train.batch_size}" + ("" if search == "batch_size" else f" x {train.seq_len}"),
        "fits",
        what,
        "estimate @ largest",
    ]
    columns += (
        ["simulate @ largest", "simulate @ next step", "reserved @ largest (model)", "confirmed"]
        if confirm
        else []
    )
    for name in columns:
        table.add_column(name, justify="left" if name in ("run", "model", "fits", "confirmed") else "right")
    for row in rows:
        if "refused" in row:  # the estimate has no closed form for it: say why, in the row
            table.add_row(Text(row["run"]), Text(row["model"]), Text("refused: " + row["refused"]),
                          *(Text("-") for _ in columns[3:]))
            continue
        cells = [
            row["run"],
            row["model"],
            format_bytes(row["estimate_bytes"]),
            "yes" if row["fits"] else "NO",
            str(best) if (best := row.get("largest", row.get("largest_batch"))) else "none",
            format_bytes(row["estimate_at_largest_bytes"]),
        ]
        if confirm:
            cells += _confirmation(row, budget)
        table.add_row(*map(Text, cells))  # run and model names are text, never markup
    return table


def markdown_table(table: Table, command: str) -> str:
    """The fit table as Markdown, headed by what regenerates it: the command, the machine, the commit, the date."""
    from galore_bench.run.assemble import environment

    env = environment()
    commit = (env["git_commit"] or "not a checkout") + (" + uncommitted changes" if env["git_dirty"] else "")
    columns = table.columns
    lines = [f"# {table.title}", "",
             f"- command: `{command}`",
             (f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()} (simulate traces "
              "fake tensors: the bytes do not depend on the machine)"),
             f"- git commit: {commit}",
             f"- generated: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC", "",
             "| " + " | ".join(str(c.header) for c in columns) + " |",
             "| " + " | ".join("---" if c.justify == "left" else "---:" for c in columns) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in zip(*(list(c.cells) for c in columns), strict=True)]
    return "\n".join([*lines, "", str(table.caption), ""])


def _confirmation(row: dict[str, Any], budget: int) -> list[str]:
    """Simulate at the largest batch and one above, the allocator model's reserved bytes, and the verdict."""
    at, above = row["simulate_at_largest_bytes"], row["simulate_above_largest_bytes"]
    model = row.get("allocator_model_at_largest")
    ok = (at is None or at <= budget) and above is not None and above > budget
    reserved = (
        "-"
        if model is None
        else "OOM"
        if model["out_of_memory"]
        else format_bytes(model["peak_reserved_bytes"])
    )
    held = row.get("largest_reserved", row.get("largest_batch_reserved"))
    out_of_memory = f"allocator model: out of memory at the cap; it holds {held or 'none'}"
    verdict = (  # an estimate off at the boundary still says what the allocator model holds, when it ran out
        "no (estimate off at the boundary" + (f"; {out_of_memory})" if model and model["out_of_memory"] else ")")
        if not ok
        else f"no ({out_of_memory})"
        if model and model["out_of_memory"]
        else "yes"
    )
    return [format_bytes(at), format_bytes(above), reserved, verdict]
