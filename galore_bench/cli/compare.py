"""`galore-bench compare A B`: B's deltas against A, as a table or md/csv/json; a gate with --fail-above."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from galore_bench.cli.output import console as default_console
from galore_bench.errors import UserError

if TYPE_CHECKING:
    from rich.table import Table

    from galore_bench.check.compare import Delta

NAME = "compare"
HELP = "deltas between two records or results folders (memory, throughput, perplexity)"
DESCRIPTION = (
    "Compare B against A (each a record file or a results folder; folders are matched by "
    "scenario and run label, newest ok record of each): peak and per-category memory, tokens/s, "
    "TGS and perplexity, as B - A and in % of A."
)
FORMATS = ("md", "csv", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="baseline: a record file or a results folder")
    parser.add_argument("b", type=Path, help="new: a record file or a results folder")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="print this format to stdout instead of the console table (or write it to --out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the comparison to this file (format from --format or the file's suffix)",
    )
    parser.add_argument(
        "--fail-above",
        metavar="PCT",
        default=None,
        help="exit 1 when the peak or any memory category grew by more than PCT%% (e.g. 5 or 5%%)",
    )


def from_args(args: argparse.Namespace) -> int:
    return run(
        args.a, args.b, fmt=args.format, out=args.out, fail_above=args.fail_above, console=default_console()
    )


def run(
    a: Path,
    b: Path,
    *,
    fmt: str | None = None,
    out: Path | None = None,
    fail_above: str | float | None = None,
    console: Console | None = None,
    errors: Console | None = None,
) -> int:
    """Print (or write) the deltas of B against A; 1 when `fail_above` is given and something grew past it."""
    from galore_bench.check import compare

    limit = compare.parse_percent(fail_above) if fail_above is not None else None
    fmt = _output_format(fmt, out)
    console, errors = console or Console(), errors or Console(stderr=True)
    pairs, only_a, only_b = compare.match_runs(Path(a), Path(b))
    if note := compare.mismatch_note(pairs):
        errors.print(Text(note, style="yellow"), soft_wrap=True)
    rows = [row for key, (_, ra), (_, rb) in pairs for row in compare.deltas(key, ra, rb)]
    if fmt is not None and out is None:  # formatted text goes to stdout alone, so it can be piped
        console.out(compare.render(rows, fmt, pairs, only_a, only_b, a, b), end="")
    else:
        cells = compare.delta_frame(rows, readable=True).itertuples(index=False)
        console.print(_console_table(rows, cells, f"B = {b} against A = {a} ({len(pairs)} run(s))"))
        for side, names in (("A", only_a), ("B", only_b)):
            if names:
                console.print(Text(f"only in {side}: {', '.join(names)}"))
        if fmt is not None and out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(compare.render(rows, fmt, pairs, only_a, only_b, a, b))
            console.print(Text(f"wrote {out}"))
    failures = [] if limit is None else compare.gate_failures(rows, pairs, only_a, limit)
    for message in failures:
        errors.print(Text(message, style="red"), soft_wrap=True)
    return 1 if failures else 0


def _output_format(fmt: str | None, out: Path | None) -> str | None:
    """The format asked for, else the --out file's suffix; refused before any record is read."""
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out: got {out}, a folder; allowed a file path such as {Path(out) / 'compare.md'}")
    if fmt is None and out is not None:
        fmt = Path(out).suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise UserError(
                f"--out: got {out}, allowed a file name ending in "
                f"{', '.join('.' + f for f in FORMATS)} (or give --format)"
            )
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format: got {fmt!r}, allowed: {', '.join(FORMATS)}")
    return fmt


def _console_table(rows: list[Delta], cells: Iterable[tuple], title: str) -> Table:
    """The long table (`cells`: each row's text), worse red and better green; labels are text, not markup."""
    from rich.table import Table

    table = Table(title=Text(title), title_justify="left")
    for column in ("scenario", "run", "quantity", "A", "B", "delta", "delta %"):
        table.add_column(column, justify="left" if column in ("scenario", "run", "quantity") else "right")
    for d, row in zip(rows, cells):
        worse = d.delta is not None and d.delta != 0 and (d.delta > 0) == d.worse_if_larger
        style = "red" if worse else "green" if d.delta else ""
        table.add_row(*(Text(str(c)) for c in row[:-1]), Text(row[-1], style=style))
    return table
