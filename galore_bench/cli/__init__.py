"""Command line: `galore-bench list | run | report | fit | compare | check | gpus | ranks | import-hf`, a module each.

Each command module has NAME, HELP, DESCRIPTION, add_arguments(parser), from_args(args) and a typed
run(...) -> int that tests call without argparse. main() is the one place a UserError becomes exit 1.
A command imports its stage (run/, measure/, report/, check/) inside run(), so `--help` loads only parsers.
"""

from __future__ import annotations

import argparse
import sys

from galore_bench.cli import check, compare, fit, gpus, import_hf, ranks, report, run
from galore_bench.cli import list as list_command
from galore_bench.errors import UserError

COMMANDS = (list_command, run, report, fit, compare, check, gpus, ranks, import_hf)  # in the order --help lists them
EPILOG = "Results are JSON records under results/<device>/<scenario>/; see README.md."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galore-bench",
        description="Will this training recipe fit, how fast will it run, what does it cost in quality? "
        "Memory, throughput and perplexity of GaLore, LOMO and their baselines on LLaMA models.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"galore-bench: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path the system refuses (too long, no permission) or a full disk: one message
        print(f"galore-bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "galore-bench: interrupted; finished records are kept (resume with --skip-existing)",
            file=sys.stderr,
        )
        return 130
