"""`galore-bench ranks`: this process's rank of a distributed scenario, for launchers that start the ranks.

`galore-bench run` starts the ranks itself; under torchrun each rank runs this command:
`torchrun --nproc-per-node N -m galore_bench.cli ranks --scenario NAME` (torchrun's `-m` takes a module).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.spec.scenario import load_scenario, selected_runs
from galore_bench.store import DEFAULT_RESULTS

NAME = "ranks"
HELP = "one rank of a distributed scenario, under torchrun (`run` starts its ranks itself)"
DESCRIPTION = (
    "`torchrun --nproc-per-node N -m galore_bench.cli ranks --scenario NAME`: every run, in order, "
    "this process being the rank torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) names. Rank 0 writes "
    "each record and prints its path."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario", required=True, help="a shipped scenario name or a .toml path with [distributed]"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results/)"
    )
    parser.add_argument("--label", action="append", help="only the run with this label (repeatable)")
    parser.add_argument(
        "--mode",
        choices=("measure", "simulate"),
        default="measure",
        help="measure (default): real ranks; simulate: no process group, rank 0 traces one device",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")


def from_args(args: argparse.Namespace) -> int:
    return run(args.scenario, out=args.out, labels=args.label, mode=args.mode, steps=args.steps)


def run(
    scenario: str,
    *,
    out: Path = DEFAULT_RESULTS,
    labels: Sequence[str] | None = None,
    mode: str = "measure",
    steps: int | None = None,
) -> int:
    """This rank's share of every run of `scenario` (or those `labels` name), printing each record written."""
    from galore_bench.run.ranks import process_group, rank_device, run_ranked, simulate_record

    loaded = load_scenario(scenario)
    if loaded.distributed is None:
        raise UserError(f"{loaded.path}: no [distributed] table; use `galore-bench run`")
    runs = [r for _, r in selected_runs(loaded, ",".join(labels) if labels else None)]  # unknown labels refused
    if mode == "simulate":  # no process group: rank 0 (or a plain process) writes the records
        if int(os.environ.get("RANK", "0")) == 0:
            for each in runs:
                print(store.write(simulate_record(loaded, each), out))
        return 0
    device = rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    with process_group(loaded.distributed, device) as backend:
        for each in runs:
            path = run_ranked(loaded, each, backend, device, steps, out)
            if path is not None:
                print(path, flush=True)
    return 0
