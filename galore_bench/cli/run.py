"""`galore-bench run`: every run of a scenario in its own process, one record each, then the results table."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.text import Text

from galore_bench.cli.output import console, note
from galore_bench.errors import UserError
from galore_bench.record import reserved_of
from galore_bench.spec.scenario import MODES, load_scenario
from galore_bench.store import DEFAULT_RESULTS
from galore_bench.store import load as load_record
from galore_bench.units import CATEGORIES, format_bytes

PROBE_BYTES = 1 << 20  # a record with its breakdowns is tens of KiB; a snapshot more: refuse a smaller file limit

if TYPE_CHECKING:
    from rich.table import Table

NAME = "run"
HELP = "run a scenario: every method, each in its own process, one record per run"
DESCRIPTION = (
    "Run every method of a scenario, each in its own process, and write one JSON record per run. "
    "Modes: estimate (closed-form byte counts), simulate (real steps on fake tensors: any "
    "size on a CPU), measure (real steps on the real device), auto (measure when the device "
    "can hold the run, else simulate). Exit status 1 when a run ended in an error (its error "
    "record is kept); an out-of-memory run is a result, not a failure."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario", required=True, help="a shipped scenario name (see `list`) or a .toml path"
    )
    parser.add_argument(
        "--mode", choices=MODES, default=None, help="override the scenario's mode (default: its own)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="override the number of training steps, >= 2 (measure mode)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results/)"
    )
    parser.add_argument(
        "--memory-snapshot",
        action="store_true",
        help="measure on a GPU: also write the CUDA allocator's memory snapshot beside each record "
        "(<record>.snapshot.pickle, for https://pytorch.org/memory_viz)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="PRESET_OR_CONFIG",
        help="replace the scenario's model: a preset name (`list --presets`) or a path to a config.json",
    )
    parser.add_argument(
        "--skip-existing", action="store_true", help="resume: skip runs that already have an ok record"
    )
    parser.add_argument(
        "--runs",
        metavar="LABELS",
        default=None,
        help="only these runs, comma-separated labels as `list` shows them (default: every run)",
    )
    parser.add_argument(
        "--submitit",
        choices=("local", "slurm"),
        default=None,
        help="dispatch each run as a submitit job (needs galore-bench[cluster]); see README 'Clusters'",
    )
    parser.add_argument(
        "--cluster-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameter, repeatable: timeout_min=120, slurm_partition=gpu, nodes=2",
    )


def from_args(args: argparse.Namespace) -> int:
    return run(
        args.scenario,
        mode=args.mode,
        steps=args.steps,
        out=args.out,
        memory_snapshot=args.memory_snapshot,
        skip_existing=args.skip_existing,
        runs=args.runs,
        submitit=args.submitit,
        cluster_options=args.cluster_option,
        model=args.model,
    )


def run(
    scenario: str,
    *,
    mode: str | None = None,
    steps: int | None = None,
    out: Path = DEFAULT_RESULTS,
    memory_snapshot: bool = False,
    skip_existing: bool = False,
    runs: str | None = None,
    submitit: str | None = None,
    cluster_options: Sequence[str] = (),
    model: str | None = None,
) -> int:
    """Run `scenario` (a shipped name or a .toml path), with `model` instead of its own when given, and print the
    results; 1 if a run crashed."""
    from galore_bench.run.cluster import parse_options, submit_scenario
    from galore_bench.run.sweep import run_scenario

    loaded = load_scenario(scenario, model)
    _refuse_bad_arguments(
        out=out,
        steps=steps,
        mode=mode or loaded.mode,
        submitit=submitit,
        cluster_options=cluster_options,
        memory_snapshot=memory_snapshot,
        distributed=loaded.distributed is not None,
    )
    if submitit:  # each run as a submitit job (local subprocesses or SLURM), records into the same folder
        paths = submit_scenario(
            loaded,
            out=out,
            executor=submitit,
            mode=mode,
            steps=steps,
            options=parse_options(cluster_options),
            skip_existing=skip_existing,
            only=runs,
        )
    else:
        paths = run_scenario(
            loaded,
            out=out,
            mode=mode,
            steps=steps,
            skip_existing=skip_existing,
            memory_snapshot=memory_snapshot,
            only=runs,
        )
    shown = console()
    shown.print(results_table(paths, title=f"{loaded.name}: {loaded.description}"))
    shown.print(f"{len(paths)} record(s) under {out}", markup=False, highlight=False)
    return exit_status(paths)


def _refuse_bad_arguments(
    *,
    out: Path,
    steps: int | None,
    mode: str,
    submitit: str | None,
    cluster_options: Sequence[str],
    memory_snapshot: bool,
    distributed: bool,
) -> None:
    """Refuse, before any run starts, what would fail late; say so when an option would have no effect."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: got {out}, a file; allowed a folder (created if missing)")
    if steps is not None and steps < 2:
        raise UserError(
            f"--steps: got {steps}, allowed an int >= 2 (step 1 creates the optimizer states; "
            "the peak is read from step 2 on)"
        )
    if cluster_options and not submitit:
        raise UserError(
            "--cluster-option: given without --submitit, allowed only with --submitit local|slurm"
        )
    if memory_snapshot and (
        mode in ("estimate", "simulate") or submitit or distributed or not torch.cuda.is_available()
    ):
        note(
            "--memory-snapshot has no effect here (it records the CUDA allocator of a single-device measure "
            "run on a GPU, run by `run` itself: not --submitit, not [distributed])"
        )
    if steps is not None and mode in ("estimate", "simulate"):
        note(
            f"--steps has no effect in {mode} mode (it sets measure mode's steps; "
            "simulate traces the steps the peak needs)"
        )
    _refuse_unwritable(out)


def _refuse_unwritable(out: Path) -> None:
    """A record that cannot be written would fail only after its run's work is done: try the folder first."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < PROBE_BYTES:
        raise UserError(f"--out: the file size limit (ulimit -f) is {limit} bytes; allowed at least {PROBE_BYTES}")
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out: got {out}, a symlink to a missing {os.readlink(out)}; allowed a folder")
    created = [folder for folder in (out, *out.parents) if not folder.exists() and not folder.is_symlink()]
    probe = out / f".galore-bench-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(bytes(PROBE_BYTES))
    except OSError as exc:
        raise UserError(f"--out: cannot write into {out} ({exc.strerror or exc}); allowed a writable folder") from None
    finally:  # the check leaves nothing behind: a refusal that follows writes nothing either
        with contextlib.suppress(OSError):
            probe.unlink()
        with contextlib.suppress(OSError):
            for folder in created:
                folder.rmdir()


def exit_status(paths: list[Path]) -> int:
    """1 when a run ended in an error (a crash, a killed worker); an out-of-memory is a result."""
    failed = [
        (record["run"], record["error"]) for record in map(load_record, paths) if record["status"] == "error"
    ]
    for label, error in failed:
        print(
            f"galore-bench: run {label} failed: {error.splitlines()[0] if error else 'no error text'}",
            file=sys.stderr,
        )
    if failed:
        print(
            f"galore-bench: {len(failed)} of {len(paths)} run(s) failed (their error records are kept)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def results_table(paths: list[Path], title: str = "results") -> Table:
    """Peak and breakdown per run, and whether it fits the budget."""
    from rich.table import Table

    records = [load_record(path) for path in paths]
    budgets = {text for record in records if (text := record["budget"]["text"]) is not None}
    caption = (
        f"fits: peak <= budget ({', '.join(sorted(budgets))}); " if budgets else ""
    ) + "reserved: the CUDA allocator's (GPU) or the caching-allocator model's (simulate)"
    table = Table(title=Text(title), caption=Text(caption))  # a description, a record's text: never markup
    headers = (
        "run",
        "mode",
        "status",
        "peak",
        "weights",
        "grads",
        "opt states",
        "activ.",
        "other",
        "fits",
        "reserved",
        "loss",
        "ppl",
        "tokens/s",
    )
    for name in headers:
        table.add_column(name, justify="left" if name in ("run", "mode", "status") else "right")
    for record in records:
        memory, breakdown = record["memory"], record["memory"].get("breakdown") or {}
        fits = record["budget"]["fits"]
        loss, ppl = record["quality"]["final_loss"], record["quality"].get("perplexity")
        rate = record["throughput"]["tokens_per_second"]
        status = (
            record["status"]
            if record["status"] == "ok"
            else f"{record['status']}: {(record['error'] or '')[:60]}"
        )
        ranks = record["distributed"]["world_size"] if record["distributed"] else None
        reserved, source = reserved_of(record)
        reserved_text = "OOM" if source and "OOM" in source else format_bytes(reserved)
        table.add_row(*map(Text, (
            record["run"] + (f" x{ranks}" if ranks else ""),
            record["mode"],
            status,
            format_bytes(memory.get("peak_bytes")),
            *(format_bytes(breakdown.get(c)) for c in CATEGORIES),
            "-" if fits is None else ("yes" if fits else "NO"),
            reserved_text,
            "-" if loss is None else f"{loss:.3f}",
            "-" if ppl is None else f"{ppl:,.1f}",
            "-" if rate is None else f"{rate:,.0f}",
        )))
    return table
