"""The scenario's [model] table: a zoo size, explicit LLaMA dimensions, a shipped preset or a config.json.

A preset or a config may be shrunk in place by overriding its fields (`num_hidden_layers = 2`, ...): the same
family and architecture at a size a CPU measures in seconds.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from galore_bench.errors import Problems, UserError, one_of
from galore_bench.models import ZOO, Model, ModelShape, matrix_shapes, meta_model
from galore_bench.models.hf import ModelInputError, make_model, preset_names, read_config_file, read_preset
from galore_bench.models.layout import projections, refuse_experts, unknown_targets

HF_KEYS = ("config", "preset", "attn_implementation")


def parse_model(problems: Problems, table: dict[str, Any], folder: Path, check_typed: Any) -> tuple[str, Model | None]:
    """(name, model) of the [model] table; problems found are added, and the model is then None."""
    if "config" in table or "preset" in table:
        return parse_hf_model(problems, table, folder)
    dims = [f.name for f in dataclasses.fields(ModelShape) if f.name != "source"]
    problems.unknown_keys("model.", table, ["size", *dims, *HF_KEYS])
    if "attn_implementation" in table:
        problems.add("model.attn_implementation", table["attn_implementation"],
                     "only with model.preset or model.config (the LLaMA zoo always uses sdpa)")
    if "size" in table:
        size = table["size"]
        if not one_of(size, ZOO):
            problems.add("model.size", size, "one of " + ", ".join(ZOO))
            return str(size), None
        extra = [k for k in table if k not in ("size", "attn_implementation")]
        if extra:
            problems.add(f"model.{extra[0]}", table[extra[0]], "no explicit dimension together with model.size")
        return size, ZOO[size]
    missing = [d for d in dims if d not in table and d != "vocab_size"]
    if missing:
        problems.add("model", "{}" if not table else sorted(table),
                     "model.size or all of " + ", ".join(dims[:4]) + " (or model.preset, model.config)")
        return "custom", None
    ok = all(check_typed(problems, f"model.{d}", table[d], int, 1) for d in dims if d in table)
    if ok and table["hidden_size"] % table["num_attention_heads"]:
        problems.add("model.num_attention_heads", table["num_attention_heads"], "a divisor of model.hidden_size")
        ok = False
    return "custom", ModelShape(**{d: table[d] for d in dims if d in table}) if ok else None


def parse_hf_model(problems: Problems, table: dict[str, Any], folder: Path) -> tuple[str, Model | None]:
    """A preset by name or a config.json (relative to the scenario file), with overrides: built once on meta."""
    if "config" in table and "preset" in table:
        problems.add("model.config", table["config"], "either model.config or model.preset, not both")
        return "custom", None
    overrides = {k: v for k, v in table.items() if k not in HF_KEYS}
    try:
        if "preset" in table:
            name = table["preset"]
            settings, source = read_preset(name)
        else:
            if not isinstance(table["config"], str) or not table["config"]:
                raise ModelInputError("model.config", table["config"], "a path to a config.json file")
            path = folder / table["config"]
            settings, source = read_config_file(path)
            name = path.stem if path.stem != "config" else (path.resolve().parent.name or "config")
        model = make_model(settings, source, preset=table.get("preset", ""), overrides=overrides,
                           attn_implementation=table.get("attn_implementation"))
    except ModelInputError as exc:
        problems.add(exc.field, exc.got, exc.allowed)
        return str(table.get("preset", table.get("config"))), None
    try:
        meta_model(model)
    except Exception as exc:  # noqa: BLE001 - transformers' own complaint about the config is the message
        problems.add("model", name, f"a config AutoModelForCausalLM.from_config builds; it says: "
                     f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return name, None
    return name + ("-shrunk" if overrides else ""), model


def run_model(problems: Problems, where: str, name: Any) -> tuple[str, Model] | None:
    """A run's own model: a zoo size or a preset by name."""
    if one_of(name, ZOO):
        return name, ZOO[name]
    if isinstance(name, str) and name in preset_names():
        return name, make_model(*read_preset(name), preset=name)
    problems.add(f"{where}.model", name, "one of " + ", ".join([*ZOO, *preset_names()]))
    return None


def check_targets(problems: Problems, where: str, method: str, targets: Any, model: Model) -> bool:
    """Whether target_modules names projections of this model, and a model with 3-D experts is not left to a
    method that would act on them (problems added otherwise)."""
    if targets and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        problems.add(f"{where}.target_modules", targets, "a list of module-name suffixes such as [\"q_proj\"]")
        return False
    if not targets and isinstance(model, ModelShape):  # the LLaMA zoo has no experts: nothing to build
        return True
    built = meta_model(model)
    if targets and (unknown := unknown_targets(built, targets)):
        leaves = sorted({name.rsplit(".", 1)[-1] for name in projections(built)})
        problems.add(f"{where}.target_modules", unknown, "suffixes of this model's projections: " + ", ".join(leaves))
        return False
    try:
        refuse_experts(built, method, targets)
    except UserError as exc:
        problems.add(f"{where} ({method})", "a model with MoE experts", str(exc))
        return False
    return True




def with_model(raw: dict[str, Any], model: str, path: Path) -> dict[str, Any]:
    """The scenario document with its [model] replaced by a preset or a config.json (relative to the working
    folder); its runs must not choose their own models, which would make the replacement meaningless."""
    own = [i for i, run in enumerate(raw.get("runs") or []) if isinstance(run, dict) and "model" in run]
    if own:
        raise UserError(f"--model: {path.stem} sets a model per run (runs[{own[0]}].model); choose a scenario "
                        "whose runs share its [model], e.g. 7b_4090")
    if "distributed" in raw:
        raise UserError(f"--model: {path.stem} has [distributed], whose ranks reload the file; write the model "
                        "into a copy of the scenario instead")
    table = {"preset": model} if model in preset_names() else {"config": str(Path(model).resolve())}
    return {**raw, "model": table}


def method_fits_model(problems: Problems, where: str, method: Any, run: dict[str, Any], resolved: dict[str, Any],
                      invalid: set[str], model_name: str, model: Model) -> bool:
    """A run's method against its model, when the scenario loads: its target_modules exist there, the method can
    take the model (MethodDef.model_problem, on the meta model) and its rank fits the smallest projected matrix.
    False when targets or model are refused (later checks that need them are skipped); `invalid`: options already
    reported with a bad value."""
    if "target_modules" in method.all_options() and "target_modules" not in invalid and not check_targets(
            problems, where, method.name, resolved["target_modules"], model):
        return False
    if method.model_problem is not None:
        why = method.model_problem(meta_model(model), resolved)
        if why:
            problems.add(f"{where} ({method.name}) model", model_name, why)
            return False
    if method.uses_rank and isinstance(resolved.get("rank"), int) and "rank" not in invalid:
        shapes = matrix_shapes(model, resolved.get("target_modules") or None)
        smallest = min(min(s) for s in shapes.values())
        if resolved["rank"] > smallest:
            given = "rank" in run
            problems.add(f"{where}.rank", resolved["rank"] if given else f"not set (default {resolved['rank']})",
                         f"an int from 1 to {smallest} (the smallest matrix side of this model)"
                         + ("" if given else ": set rank"))
    return True
