"""`galore-bench list`: the shipped scenarios, one line each, with the runs each holds."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from galore_bench.models.hf import preset_names, read_preset
from galore_bench.spec.scenario import load_scenario, shipped_scenarios

NAME = "list"
HELP = "list the shipped scenarios (or model presets), one line each"
DESCRIPTION = ("List the scenarios shipped inside the package (galore_bench/scenarios), one line each; with "
               "--presets, the model presets ([model] preset = ..., run --model ...) and the config each cites.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", action="store_true", help="list the model presets instead")


def from_args(args: argparse.Namespace) -> int:
    return run(presets=args.presets)


def run(console: Console | None = None, presets: bool = False) -> int:
    console = console or Console()
    if presets:
        for name in preset_names():
            settings, _ = read_preset(name)
            family, source = str(settings["model_type"]), str(settings["_source"])
            console.print(f"[bold]{escape(f'{name:<16}')}[/bold] {escape(f'{family:<10}')} [dim]{escape(source)}[/dim]",
                          highlight=False)
        return 0
    for name in shipped_scenarios():
        scenario = load_scenario(name)
        methods = ", ".join(r.label for r in scenario.runs)
        console.print(  # the scenario's own text is escaped: a '[/x]' in a description is text, not markup
            f"[bold]{escape(f'{scenario.name:<16}')}[/bold] {escape(f'{scenario.model_name:>5}')}  "
            f"{escape(scenario.description)}  [dim]({escape(methods)})[/dim]",
            highlight=False,
            soft_wrap=True,  # one line per scenario, however many runs it holds (modern_24gb: 15)
        )
    return 0
