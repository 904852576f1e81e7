"""Scenario files (TOML) to a validated spec: every problem found, reported once, before anything is built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tomllib

from galore_bench.errors import SAFE_NAME, Problems, UserError, is_safe_name, listed, one_of, shown, type_name
from galore_bench.methods import REGISTRY, TrainSettings, precision
from galore_bench.methods.base import LOSS_NAMES
from galore_bench.models import DTYPES, Model
from galore_bench.spec.distributed import DistributedSpec, parse_distributed
from galore_bench.spec.model import method_fits_model, parse_model, run_model, with_model
from galore_bench.spec.study import StudySpec, parse_lr_grid, parse_study
from galore_bench.units import ALLOWED_UNITS, parse_bytes

# package data, read through importlib.resources: an installed wheel need not be a plain folder
SHIPPED_SCENARIOS = resources.files("galore_bench") / "scenarios"
MODES = ("auto", "estimate", "simulate", "measure")
DATA_SOURCES = ("synthetic", "wiki", "wiki-bytes")  # wiki-bytes: UTF-8 bytes, model.vocab_size = 258
LR_SCHEDULES = ("constant", "cosine")
LOSSES = LOSS_NAMES


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One method with its resolved options (defaults filled in)."""

    method: str
    options: dict[str, Any]
    label: str
    model_name: str
    model: Model
    lr_grid: tuple[float, ...] = ()  # a study's learning rates for this run (spec/study.py); () = its lr
    tuning: dict[str, Any] | None = None  # set on one training of a study: grid, seed, the choice if made


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str
    description: str
    model_name: str
    model: Model
    train: TrainSettings
    budget_bytes: int | None
    budget_text: str | None
    mode: str
    data: str
    eval_batches: int
    eval_every: int  # steps between validation perplexities during a run (0: only at the end)
    runs: tuple[RunSpec, ...] = field(default=())
    distributed: DistributedSpec | None = None  # None: one device, no process group
    study: StudySpec | None = None  # seeds, lr grids and step-time cost (spec/study.py); None: plain runs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def selected_runs(scenario: Scenario, only: str | None = None) -> list[tuple[int, RunSpec]]:
    """(index in the file, run) for the runs named in `only` (comma-separated labels), or every run.

    The index travels to the worker, which reads the same file: selecting never renumbers a run.
    """
    pairs = list(enumerate(scenario.runs))
    if only is None:
        return pairs
    wanted = [label.strip() for label in only.split(",") if label.strip()]
    labels = [run.label for run in scenario.runs]
    if (unknown := [label for label in wanted if label not in labels]) or not wanted:
        raise UserError(f"--runs: {scenario.name} has no run labelled {', '.join(unknown) or repr(only)}; "
                        f"its runs: {', '.join(labels)}")
    return [(i, run) for i, run in pairs if run.label in wanted]


def run_label(method: str, opts: dict[str, Any], model_name: str | None = None) -> str:
    """Stable run name used in file names and reports: method, its distinguishing switch, its own model."""
    if opts.get("label"):
        return str(opts["label"])
    return method + ("-layerwise" if opts.get("layerwise") else "") + (f"-{model_name}" if model_name else "")


def shipped_scenarios() -> list[str]:
    """The names of the scenarios shipped inside the package, sorted (what `list` prints)."""
    return sorted(entry.name.removesuffix(".toml") for entry in SHIPPED_SCENARIOS.iterdir()
                  if entry.name.endswith(".toml"))


def find_scenario(name_or_path: str) -> Traversable:
    """A user's .toml file by path, or a shipped scenario by name."""
    path = Path(name_or_path)
    try:
        if path.suffix == ".toml" or path.exists():
            if not path.is_file():
                raise UserError(f"{name_or_path}: no such scenario file")
            return path
    except (OSError, ValueError) as exc:  # a name over 255 bytes, a NUL
        raise UserError(f"{shown(name_or_path, 80)}: not a usable path "
                        f"({getattr(exc, 'strerror', None) or exc})") from None
    shipped = SHIPPED_SCENARIOS / f"{name_or_path}.toml"
    if not shipped.is_file():
        known = ", ".join(shipped_scenarios())
        raise UserError(f"{name_or_path}: unknown scenario; allowed: {known} or a path to a .toml file")
    return shipped


def load_scenario(name_or_path: str, model: str | None = None) -> Scenario:
    """A scenario by name or path; `model` (a preset or a config.json path) replaces its [model] (`run --model`)."""
    source = find_scenario(name_or_path)
    path = Path(str(source))  # a shipped one installed as files: its real path, which a run's process reloads
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable UTF-8 text file ({exc})") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise UserError(f"{path}: not valid TOML: {shown(str(exc), 200)}") from None
    except RecursionError:
        raise UserError(f"{path}: not a scenario: nested too deeply to read") from None
    if model is None:
        return parse_scenario(raw, path)
    scenario = parse_scenario(with_model(raw, model, path), path)
    return dataclasses.replace(scenario, name=f"{scenario.name}-{scenario.model_name}")


# Generous bounds no real training reaches: beyond them even the closed-form estimate takes minutes and
# gigabytes (it lists every layer's tensors), and a 400-digit number overflows the first float it meets.
LARGEST = {"hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 1024,
           "num_attention_heads": 65536, "vocab_size": 10**7, "batch_size": 10**9, "seq_len": 10**9,
           "steps": 10**6, "grad_accum": 10**6, "loss_chunk_tokens": 10**9, "warmup_steps": 10**6, "seed": 2**63 - 1,
           "batches": 10**6, "every": 10**6}
MAX_TOKENS = 10**9  # train.batch_size * train.seq_len: tokens in one micro-batch


def _check_typed(problems: Problems, where: str, value: Any, kind: type, minimum: float | None) -> bool:
    is_number = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number or (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if not ok:
        problems.add(where, value, type_name(kind))
    elif minimum is not None and value < minimum:
        problems.add(where, value, f"{type_name(kind)} >= {minimum:g}")
        ok = False
    elif (top := LARGEST.get(where.rsplit(".", 1)[-1])) is not None and value > top:
        problems.add(where, value, f"{type_name(kind)} from {minimum:g} to {top:,} (no real run is larger)")
        ok = False
    return ok


def _parse_train(problems: Problems, table: dict[str, Any]) -> TrainSettings:
    defaults = TrainSettings()
    problems.unknown_keys("train.", table, [f.name for f in dataclasses.fields(TrainSettings)])
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainSettings):
        if f.name not in table:
            continue
        value, kind = table[f.name], type(getattr(defaults, f.name))
        if f.name in ("dtype", "lr_schedule", "loss", "precision"):
            allowed = {"dtype": DTYPES, "lr_schedule": LR_SCHEDULES, "loss": LOSSES,
                       "precision": precision.PRECISIONS}[f.name]
            if not one_of(value, allowed):
                problems.add(f"train.{f.name}", value, "one of " + ", ".join(allowed))
                continue
        elif not _check_typed(problems, f"train.{f.name}", value, kind,
                              None if kind is bool else 0 if f.name in ("seed", "warmup_steps") else 1):
            continue
        values[f.name] = value
    settings = dataclasses.replace(defaults, **values)
    if settings.precision:  # dtype follows the precision (its weights' dtype) unless it contradicts it
        for where, got, allowed in precision.train_problems(table, settings):
            problems.add(where, got, allowed)
        settings = dataclasses.replace(settings, dtype=precision.PRECISIONS[settings.precision].weights)
    if settings.batch_size * settings.seq_len > MAX_TOKENS:
        problems.add("train.batch_size * train.seq_len", settings.batch_size * settings.seq_len,
                     f"at most {MAX_TOKENS:,} tokens in one micro-batch (more than any real training)")
    return settings


def _parse_runs(problems: Problems, runs: Any, model_name: str, model: Model | None,
                train: TrainSettings) -> list[RunSpec]:
    if not isinstance(runs, list) or not runs:
        problems.add("runs", runs, "a non-empty array of [[runs]] tables")
        return []
    specs = []
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(run, dict) or "method" not in run:
            problems.add(f"{where}.method", run.get("method") if isinstance(run, dict) else run,
                         "one of " + ", ".join(REGISTRY))
            continue
        method = REGISTRY.get(run["method"]) if isinstance(run["method"], str) else None
        if method is None:
            problems.add(f"{where}.method", run["method"], "one of " + ", ".join(REGISTRY))
            continue
        options = method.all_options()
        problems.unknown_keys(f"{where}.", run, ["method", "model", "lr_grid", *options])
        grid = parse_lr_grid(problems, where, run)
        run_model_name, model_of_run = model_name, model
        if "model" in run:
            own = run_model(problems, where, run["model"])
            if own is None:
                continue
            run_model_name, model_of_run = own
        resolved = {name: opt.default for name, opt in options.items()}
        invalid = set()  # options given with a bad value: reported here, not checked again below
        for name, value in run.items():
            if name in options:
                allowed = options[name].problem(value)
                if allowed:
                    problems.add(f"{where}.{name}", value, allowed)
                    invalid.add(name)
                else:
                    resolved[name] = float(value) if options[name].kind is float else value
        targets_ok = model_of_run is not None and method_fits_model(problems, where, method, run, resolved, invalid,
                                                                   run_model_name, model_of_run)
        for field_name, got, allowed in [*method.limits(resolved, train, model_of_run if targets_ok else None),
                                         *precision.method_problems(method, resolved, train)]:
            problems.add(f"{where} ({method.name}) {field_name}", got, allowed)
        if model_of_run is None:
            continue
        label = run_label(method.name, resolved, run.get("model"))
        if not is_safe_name(label):  # it names the record's file
            problems.add(f"{where}.label", label, SAFE_NAME)
            continue
        specs.append(RunSpec(method.name, resolved, label, run_model_name, model_of_run, grid))
    labels = [s.label for s in specs]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        problems.add("runs", label, "distinct run labels (set `label` on one of the runs)")
    return specs


def parse_scenario(raw: dict[str, Any], path: Path) -> Scenario:
    """Validate a parsed TOML document; raise UserError listing every problem."""
    problems = Problems(path)
    if not is_safe_name(path.stem):  # it names the folder of the records and the report's files
        problems.add("scenario name", path.stem, SAFE_NAME + ": rename the file")
    problems.unknown_keys("", raw, ["description", "model", "train", "device", "eval", "runs", "distributed",
                                    "study"])
    model_name, model = parse_model(problems, problems.table(raw, "model"), path.parent, _check_typed)
    train = _parse_train(problems, problems.table(raw, "train"))
    device = problems.table(raw, "device")
    problems.unknown_keys("device.", device, ["budget", "mode"])
    budget_text, budget = device.get("budget"), None
    if budget_text is not None:
        try:
            budget = parse_bytes(budget_text)
        except ValueError:
            problems.add("device.budget", budget_text, f"a size > 0 such as '24 GiB' (units {ALLOWED_UNITS})")
        else:
            if budget <= 0:
                problems.add("device.budget", budget_text, "a size > 0 such as '24 GiB' (no run fits in 0 bytes)")
    mode = device.get("mode", "auto")
    if mode not in MODES:
        problems.add("device.mode", mode, "one of " + ", ".join(MODES))
    evaluation = problems.table(raw, "eval")
    problems.unknown_keys("eval.", evaluation, ["data", "batches", "every"])
    data = evaluation.get("data", "synthetic")
    if data not in DATA_SOURCES:
        problems.add("eval.data", data, "one of " + ", ".join(DATA_SOURCES))
    eval_batches = evaluation.get("batches", 0)
    _check_typed(problems, "eval.batches", eval_batches, int, 0)
    eval_every = evaluation.get("every", 0)
    _check_typed(problems, "eval.every", eval_every, int, 0)
    description = raw.get("description", "")
    if not isinstance(description, str):
        problems.add("description", description, "a string")
    runs = _parse_runs(problems, raw.get("runs"), model_name, model, train)
    distributed = parse_distributed(problems, problems.table(raw, "distributed"), runs, mode)
    if isinstance(eval_every, int) and eval_every and not eval_batches:
        problems.add("eval.every", eval_every, "0 unless eval.batches > 0 (there is nothing to evaluate on)")
    if distributed is not None and "chunked" in {precision.run_settings(train, run.options).loss for run in runs}:
        problems.add("train.loss", train.loss, "'full' with [distributed] (the chunked loss reads the LM head's "
                     "weight outside the head's forward, where FSDP2 holds only a shard of it)")
    if isinstance(eval_batches, int) and eval_batches and distributed is not None:
        problems.add("eval.batches", eval_batches,
                     "0 with [distributed] (perplexity is measured on single-device runs)")
    study = parse_study(problems, problems.table(raw, "study"), train.seed) \
        if "study" in raw or any(run.lr_grid for run in runs) else None
    if data == "wiki-bytes" and model is not None and model.vocab_size != 258:
        problems.add("model.vocab_size", model.vocab_size, "258 with eval.data = 'wiki-bytes' (256 bytes, BOS, EOS)")
    if study is not None and distributed is not None:
        problems.add("study", "a [study] table", "no [study] with [distributed] (seeds and grids are single-device)")
    if problems.lines:
        raise UserError(f"{len(problems.lines)} problem(s) in scenario {path}:\n" + listed(problems.lines))
    if model is None:  # unreachable: a missing model always adds a problem above
        raise UserError(f"{path}: model: no model")
    return Scenario(path.stem, str(path), description, model_name, model, train, budget, budget_text,
                    mode, data, eval_batches, eval_every, tuple(runs), distributed, study)
