"""`galore-bench list`: the shipped scenarios, one line each, with the runs each holds."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

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
        console.print(  # the scenario's own text is escaped: a '[/x]' in a description is text, not markup
            f"[bold]{escape(f'{scenario.name:<16}')}[/bold] {escape(f'{scenario.model_name:>5}')}  "
            f"{escape(scenario.description)}  [dim]({escape(methods)})[/dim]",
            highlight=False,
        )
    return 0
