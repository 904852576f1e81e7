"""`galore-bench report`: tables and charts of result records, beside the papers' numbers."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from galore_bench.cli.output import console as default_console
from galore_bench.store import DEFAULT_RESULTS

NAME = "report"
HELP = "tables and charts of records, beside the papers' numbers"
DESCRIPTION = (
    "Render result records as markdown/CSV tables and charts (memory breakdown, throughput, "
    "memory vs perplexity), per scenario, with the LOMO and GaLore papers' numbers beside ours "
    "where the setting matches (differences over 5% flagged, with their known cause); html: one "
    "self-contained report.html with every table and chart."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="*", type=Path, help="record files or folders (default: results/)")
    parser.add_argument(
        "--format",
        default="md,csv,png",
        help="comma-separated: md, csv, png, svg, html (default: md,csv,png)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("reports/latest"), help="output folder (default: reports/latest)"
    )


def from_args(args: argparse.Namespace) -> int:
    return run(args.results, out=args.out, formats=args.format)


def run(
    results: list[Path],
    *,
    out: Path = Path("reports/latest"),
    formats: str = "md,csv,png",
    console: Console | None = None,
) -> int:
    """Write the report of the records under `results` (default: results/) into `out`, printing its tables."""
    from galore_bench.report.render import parse_formats, render_report

    console = console or default_console()
    written = render_report(results or [DEFAULT_RESULTS], out, parse_formats(formats), console=console)
    console.print(f"{len(written)} file(s) under {out}", markup=False, highlight=False)
    return 0
