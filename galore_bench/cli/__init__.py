"""Command line: `galore-bench list | run | fit | report | compare | check`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from galore_bench.errors import UserError
from galore_bench.spec.scenario import MODES, load_scenario, shipped_scenarios
from galore_bench.store import DEFAULT_RESULTS

EPILOG = "Results are JSON records under results/<device>/<scenario>/; see README.md."


def cmd_list(args: argparse.Namespace) -> int:
    console = Console()
    for name in shipped_scenarios():
        scenario = load_scenario(name)
        methods = ", ".join(r.label for r in scenario.runs)
        console.print(f"[bold]{scenario.name:<16}[/bold] {scenario.model_name:>5}  {scenario.description}  "
                      f"[dim]({methods})[/dim]", highlight=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from galore_bench.run.sweep import results_table, run_scenario

    scenario = load_scenario(args.scenario)
    _check_run_arguments(args, scenario.mode, distributed=scenario.distributed is not None)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.submitit:  # each run as a submitit job (local subprocesses or SLURM), records into the same folder
        from galore_bench.run.cluster import parse_options, submit_scenario

        paths = submit_scenario(scenario, out=args.out, executor=args.submitit, mode=args.mode, steps=args.steps,
                                options=parse_options(args.cluster_option), skip_existing=args.skip_existing,
                                only=args.runs)
    else:
        paths = run_scenario(scenario, out=args.out, mode=args.mode, steps=args.steps,
                             skip_existing=args.skip_existing, memory_snapshot=args.memory_snapshot, only=args.runs)
    console.print(results_table(paths, title=f"{scenario.name}: {scenario.description}"))
    console.print(f"{len(paths)} record(s) under {args.out}")
    return _exit_status(paths)


def _check_run_arguments(args: argparse.Namespace, scenario_mode: str, distributed: bool) -> None:
    """Refuse, before any run starts, what would fail late or be silently ignored."""
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out: got {args.out}, a file; allowed a folder (created if missing)")
    if args.steps is not None and args.steps < 2:
        raise UserError(f"--steps: got {args.steps}, allowed an int >= 2 (step 1 creates the optimizer states; "
                        "the peak is read from step 2 on)")
    if args.cluster_option and not args.submitit:
        raise UserError("--cluster-option: given without --submitit, allowed only with --submitit local|slurm")
    mode = args.mode or scenario_mode
    if args.memory_snapshot and (mode in ("estimate", "simulate") or args.submitit or distributed
                                 or not _has_cuda()):
        print("galore-bench: note: --memory-snapshot has no effect here (it records the CUDA allocator of a "
              "single-device measure run on a GPU, run by `run` itself: not --submitit, not [distributed])",
              file=sys.stderr)
    if args.steps is not None and mode in ("estimate", "simulate"):
        print(f"galore-bench: note: --steps has no effect in {mode} mode (it sets measure mode's steps; "
              "simulate traces the steps the peak needs)", file=sys.stderr)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _exit_status(paths: list[Path]) -> int:
    """1 when a run ended in an error (a crash, a killed worker); an out-of-memory is a result, not a failure."""
    from galore_bench.store import load as load_record

    failed = [(record["run"], record["error"]) for record in map(load_record, paths) if record["status"] == "error"]
    for run, error in failed:
        print(f"galore-bench: run {run} failed: {error.splitlines()[0] if error else 'no error text'}",
              file=sys.stderr)
    if failed:
        print(f"galore-bench: {len(failed)} of {len(paths)} run(s) failed (their error records are kept)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    from galore_bench.check.budgets import run_check

    return run_check(args.budgets, args.results or [DEFAULT_RESULTS], run=args.run)


def cmd_report(args: argparse.Namespace) -> int:
    from galore_bench.report.render import parse_formats, render_report

    console = Console(width=None if sys.stdout.isatty() else 160)
    written = render_report(args.results or [DEFAULT_RESULTS], args.out, parse_formats(args.format),
                            console=console)
    console.print(f"{len(written)} file(s) under {args.out}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from rich.table import Table

    from galore_bench.measure.largest_batch import fit_rows
    from galore_bench.units import format_bytes, parse_bytes

    scenario = load_scenario(args.scenario)
    text = args.budget or scenario.budget_text
    if text is None:
        raise UserError(f"{scenario.path}: device.budget: not set; give --budget such as '24 GiB'")
    try:
        budget = parse_bytes(text)
    except ValueError:
        budget = 0
    if budget <= 0:
        raise UserError(f"--budget: got {text!r}, allowed a size > 0 such as '24 GiB'")
    train = scenario.train
    table = Table(title=f"{scenario.name}: fit in {text} (estimate; seq {train.seq_len}, {train.dtype})",
                  caption="estimate = closed-form bytes; simulate = the real step traced on fake tensors; reserved = "
                          "that trace through a model of the CUDA caching allocator, capped at the budget")
    columns = ["run", "model", f"peak @ batch {train.batch_size}", "fits", "largest batch", "estimate @ largest"]
    columns += ["simulate @ largest", "simulate @ largest+1", "reserved @ largest (model)", "confirmed"] \
        if args.confirm else []
    for name in columns:
        table.add_column(name, justify="left" if name in ("run", "model", "fits", "confirmed") else "right")
    console = Console(width=None if sys.stdout.isatty() else 160)
    with console.status("estimating", spinner="dots") as status:
        rows = fit_rows(scenario, budget, confirm=args.confirm,
                        tracing=lambda label, batch: status.update(f"simulate: tracing {label} at batch {batch}"))
    for row in rows:
        cells = [row["run"], row["model"], format_bytes(row["estimate_bytes"]), "yes" if row["fits"] else "NO",
                 str(row["largest_batch"]) if row["largest_batch"] else "none", format_bytes(row["estimate_at_largest_bytes"])]
        if args.confirm:
            at, above = row["simulate_at_largest_bytes"], row["simulate_above_largest_bytes"]
            model = row.get("allocator_model_at_largest")
            ok = (at is None or at <= budget) and above is not None and above > budget
            reserved = "-" if model is None else "OOM" if model["out_of_memory"] else format_bytes(
                model["peak_reserved_bytes"])
            held = row.get("largest_batch_reserved")
            verdict = ("no (estimate off at the boundary)" if not ok else
                       f"no (allocator model: out of memory at the cap; it holds batch {held or 'none'})"
                       if model and model["out_of_memory"] else "yes")
            cells += [format_bytes(at), format_bytes(above), reserved, verdict]
        table.add_row(*cells)
    console.print(table)
    if scenario.distributed is not None:  # the estimate is per device, unsharded
        spread = scenario.distributed
        console.print(f"note: one device, unsharded: {Path(scenario.path).name}'s [distributed] table ({spread.strategy}, "
                      f"world size {', '.join(map(str, spread.world_sizes))}) is not applied here; "
                      f"`galore-bench run --scenario {args.scenario}` simulates the per-rank peaks", highlight=False,
                      markup=False)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from galore_bench.check.compare import run_compare

    return run_compare(args.a, args.b, fmt=args.format, out=args.out, fail_above=args.fail_above,
                       console=Console(width=None if sys.stdout.isatty() else 160))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galore-bench",
        description="Will this training recipe fit, how fast will it run, what does it cost in quality? "
                    "Memory, throughput and perplexity of GaLore, LOMO and their baselines on LLaMA models.",
        epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list the shipped scenarios, one line each",
                                  description="List the scenarios shipped in scenarios/, one line each.")
    listing.set_defaults(func=cmd_list)

    run = commands.add_parser(
        "run", help="run a scenario: every method, each in its own process, one record per run",
        description="Run every method of a scenario, each in its own process, and write one JSON record per run. "
                    "Modes: estimate (closed-form byte counts), simulate (real steps on fake tensors: any "
                    "size on a CPU), measure (real steps on the real device), auto (measure when the device "
                    "can hold the run, else simulate). Exit status 1 when a run ended in an error (its error "
                    "record is kept); an out-of-memory run is a result, not a failure.")
    run.add_argument("--scenario", required=True, help="a shipped scenario name (see `list`) or a .toml path")
    run.add_argument("--mode", choices=MODES, default=None, help="override the scenario's mode (default: its own)")
    run.add_argument("--steps", type=int, default=None, help="override the number of training steps, >= 2 (measure mode)")
    run.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results/)")
    run.add_argument("--memory-snapshot", action="store_true",
                     help="measure on a GPU: also write the CUDA allocator's memory snapshot beside each record "
                          "(<record>.snapshot.pickle, for https://pytorch.org/memory_viz)")
    run.add_argument("--skip-existing", action="store_true", help="resume: skip runs that already have an ok record")
    run.add_argument("--runs", metavar="LABELS", default=None,
                     help="only these runs, comma-separated labels as `list` shows them (default: every run)")
    run.add_argument("--submitit", choices=("local", "slurm"), default=None,
                     help="dispatch each run as a submitit job (needs galore-bench[cluster]); see README 'Clusters'")
    run.add_argument("--cluster-option", action="append", default=[], metavar="KEY=VALUE",
                     help="submitit parameter, repeatable: timeout_min=120, slurm_partition=gpu, nodes=2")
    run.set_defaults(func=cmd_run)

    report = commands.add_parser(
        "report", help="tables and charts of records, beside the papers' numbers",
        description="Render result records as markdown/CSV tables and charts (memory breakdown, throughput, "
                    "memory vs perplexity), per scenario, with the LOMO and GaLore papers' numbers beside ours "
                    "where the setting matches (differences over 5% flagged, with their known cause); html: one "
                    "self-contained report.html with every table and chart.")
    report.add_argument("results", nargs="*", type=Path, help="record files or folders (default: results/)")
    report.add_argument("--format", default="md,csv,png",
                        help="comma-separated: md, csv, png, svg, html (default: md,csv,png)")
    report.add_argument("--out", type=Path, default=Path("reports/latest"),
                        help="output folder (default: reports/latest)")
    report.set_defaults(func=cmd_report)

    fit = commands.add_parser(
        "fit", help="will each run fit a memory budget, and what is the largest batch that does? (instant estimate)",
        description="For every run of a scenario: the estimated peak at its batch size, whether it fits the budget, "
                    "and the largest per-device batch that fits (bisection on the closed-form estimate). --confirm "
                    "re-checks with the simulate engine at that batch and one above, and replays that trace through "
                    "the caching-allocator model: reserved bytes under the budget, and the largest batch it holds.")
    fit.add_argument("--scenario", required=True, help="a shipped scenario name (see `list`) or a .toml path")
    fit.add_argument("--budget", default=None, help="memory per device, e.g. '24 GiB' (default: the scenario's)")
    fit.add_argument("--confirm", action="store_true", help="confirm with simulate (seconds per run for 7B)")
    fit.set_defaults(func=cmd_fit)

    compare = commands.add_parser(
        "compare", help="deltas between two records or results folders (memory, throughput, perplexity)",
        description="Compare B against A (each a record file or a results folder; folders are matched by "
                    "scenario and run label, newest ok record of each): peak and per-category memory, tokens/s, "
                    "TGS and perplexity, as B - A and in % of A.")
    compare.add_argument("a", type=Path, help="baseline: a record file or a results folder")
    compare.add_argument("b", type=Path, help="new: a record file or a results folder")
    compare.add_argument("--format", choices=("md", "csv", "json"), default=None,
                         help="print this format to stdout instead of the console table (or write it to --out)")
    compare.add_argument("--out", type=Path, default=None,
                         help="write the comparison to this file (format from --format or the file's suffix)")
    compare.add_argument("--fail-above", metavar="PCT", default=None,
                         help="exit 1 when the peak or any memory category grew by more than PCT%% (e.g. 5 or 5%%)")
    compare.set_defaults(func=cmd_compare)

    check = commands.add_parser(
        "check", help="check result records against a budgets file (memory, speed, quality); exit 1 on a violation",
        description="Check the newest ok record of each (scenario, run) against the limits in a budgets TOML "
                    "([[budget]] tables: peak, memory categories, tgs_min, perplexity_max, baseline + grow_max).")
    check.add_argument("--budgets", type=Path, required=True, help="the budgets .toml file")
    check.add_argument("results", nargs="*", type=Path, help="record files or folders (default: results/)")
    check.add_argument("--run", action="store_true",
                       help="first run each referenced scenario in simulate mode into the (first) results folder")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"galore-bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("galore-bench: interrupted; finished records are kept (resume with --skip-existing)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
