"""`galore-bench import-hf`: a Hugging Face TrainingArguments JSON plus a model -> a scenario TOML file."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from galore_bench.errors import UserError

NAME = "import-hf"
HELP = "turn a transformers TrainingArguments JSON and a model config into a scenario"
DESCRIPTION = ("Write a scenario TOML from TrainingArguments.to_json_string() output and a config.json (or preset "
               "name): optim (+ optim_args, optim_target_modules), bf16/fp16, batch, accumulation, checkpointing, "
               "learning rate and max_steps map onto galore-bench's method and [train]; a name without a "
               "counterpart is refused with the allowed values. Then: galore-bench run --scenario OUT.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("training_args", type=Path, help="the TrainingArguments JSON file")
    parser.add_argument("--model", required=True, help="config.json path or preset name (list --presets)")
    parser.add_argument("--seq-len", type=int, required=True,
                        help="tokens per sequence of your batches (TrainingArguments does not hold it)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="weights' dtype when neither bf16 nor fp16 is set (a model loaded in bf16: bf16)")
    parser.add_argument("--out", type=Path, required=True, help="the scenario .toml file to write")


def from_args(args: argparse.Namespace) -> int:
    return run(args.training_args, args.model, args.seq_len, args.out, args.dtype)


def run(training_args: Path, model: str, seq_len: int, out: Path, dtype: str = "fp32") -> int:
    from galore_bench.integrations import hf_args  # loads models and spec: only when the command runs

    try:
        args = json.loads(training_args.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{training_args}: not a readable text file ({exc})") from None
    except ValueError as exc:
        raise UserError(f"{training_args}: not JSON: {exc}") from None
    if out.suffix != ".toml":
        raise UserError(f"--out: got {out}, allowed a path ending in .toml")
    out.parent.mkdir(parents=True, exist_ok=True)  # the model's config path is written relative to it
    document, notes = hf_args.scenario_document(args, model, seq_len, dtype=dtype, where=str(training_args),
                                                folder=out.parent)
    hf_args.validated(document, out.parent, out.stem)  # the file will load: every option checked now
    header = [f"# imported by galore-bench import-hf from {training_args.name}", *(f"# note: {n}" for n in notes)]
    out.write_text("\n".join([*header, *toml_lines(document)]) + "\n", encoding="utf-8")
    print(f"wrote {out}; run it: galore-bench run --scenario {out}")
    return 0


def toml_lines(document: dict[str, Any]) -> list[str]:
    """The scenario's TOML: top-level keys, then each table, then [[runs]] (values: str, int, float, bool, lists)."""
    lines = [f"{key} = {toml_value(value)}" for key, value in document.items() if not isinstance(value, (dict, list))]
    for key, value in document.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in value.items())]
        elif isinstance(value, list):
            for table in value:
                lines += ["", f"[[{key}]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    return lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"a value of {value}: allowed finite numbers")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string
