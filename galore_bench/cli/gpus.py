"""`galore-bench gpus`: how many GPUs each run needs, one page per scenario with a world-size search.

A command of its own rather than a `report` option: its page (<scenario>_gpus.md and .csv, with LOMO Table 2's
counts and a sentence per row explaining them) is a document of its own; `report` has the table as a section.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "gpus"
HELP = "how many GPUs each run needs: the table a simulated world-size search answers"
DESCRIPTION = (
    "How many GPUs each run needs: the table a simulated world-size search (`world_size = [1, 2, ...]`) "
    "answers. Writes <scenario>_gpus.md and .csv per scenario, beside LOMO Table 2's counts."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="record files or folders")
    parser.add_argument(
        "--out", type=Path, default=Path("reports/latest"), help="output folder (default: reports/latest)"
    )


def from_args(args: argparse.Namespace) -> int:
    return run(args.results, out=args.out)


def run(results: list[Path], *, out: Path = Path("reports/latest")) -> int:
    """Write the GPUs-needed pages of the records under `results` into `out`, printing each file written."""
    from galore_bench import store
    from galore_bench.report.gpus import write_pages

    records, files, skipped = store.load_latest(results)
    for path in write_pages(records, files, skipped, out):
        print(path)
    return 0
