"""`galore-bench list`: the shipped scenarios, one line each, with the runs each holds."""

from __future__ import annotations

import argparse

from rich.console import Console

from galore_bench.spec.scenario import load_scenario, shipped_scenarios

NAME = "list"
HELP = "list the shipped scenarios, one line each"
DESCRIPTION = "List the scenarios shipped inside the package (galore_bench/scenarios), one line each."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: every shipped scenario is listed."""


def from_args(args: argparse.Namespace) -> int:
    return run()


def run(console: Console | None = None) -> int:
    console = console or Console()
    for name in shipped_scenarios():
        scenario = load_scenario(name)
        methods = ", ".join(r.label for r in scenario.runs)
        console.print(
            f"[bold]{scenario.name:<16}[/bold] {scenario.model_name:>5}  {scenario.description}  "
            f"[dim]({methods})[/dim]",
            highlight=False,
        )
    return 0
