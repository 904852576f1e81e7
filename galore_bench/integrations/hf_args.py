"""A Hugging Face `TrainingArguments` JSON (as `to_json_string()` writes it) to a galore-bench scenario.

Why a translation and not a re-implementation: the user's recipe is what they train, so every field that changes
memory (the optimizer and its arguments, the precision flags, the batch, accumulation, checkpointing) must land on
the method and setting galore-bench measures the same way, and anything without such a counterpart is refused by
name rather than dropped. The optimizer names are those of transformers' `OptimizerNames` (5.24, checked against
`transformers.training_args.OptimizerNames` in the tests); each maps to the method whose optimizer holds the same
state, configured as transformers' `trainer_optimizer.py` configures its own (e.g. GaLore takes no Adam arguments
from TrainingArguments there, APOLLO and AdamW do).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from galore_bench.errors import UserError, shown
from galore_bench.models import Model, meta_model
from galore_bench.models.layout import projections
from galore_bench.spec.scenario import Scenario, parse_scenario

# optim name -> (method, fixed options). adamw_hf is the old transformers AdamW (gone from transformers 5's enum, still
# in older JSON files): the same two fp32 moments as torch's.
OPTIM_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw_torch": ("adamw", {}),
    "adamw_torch_fused": ("adamw", {"impl": "fused"}),
    "adamw_hf": ("adamw", {}),
    "adamw_bnb_8bit": ("adam8bit", {}),
    "adamw_8bit": ("adam8bit", {}),
    "adamw_torch_8bit": ("torchao_adamw8bit", {}),
    "adamw_torch_4bit": ("torchao_adamw4bit", {}),
    "adafactor": ("adafactor", {}),
    "sgd": ("sgd", {}),
    "galore_adamw": ("galore", {}),
    "galore_adamw_8bit": ("galore8bit", {}),
    "galore_adamw_layerwise": ("galore", {"layerwise": True}),
    "galore_adamw_8bit_layerwise": ("galore8bit", {"layerwise": True}),
    "apollo_adamw": ("apollo", {}),
    "apollo_adamw_layerwise": ("apollo", {"layerwise": True}),
    "lomo": ("lomo", {}),
    "adalomo": ("adalomo", {}),
}
# methods transformers hands adam_beta1 / adam_beta2 / adam_epsilon (its `adam_kwargs`)
TAKES_ADAM_ARGS = {"adamw", "adam8bit", "torchao_adamw8bit", "torchao_adamw4bit", "apollo"}
# optim_args keys transformers reads for a method -> (our option, type); a value in FIXED must be the one we run
OPTIM_ARGS: dict[str, dict[str, tuple[str, type]]] = {
    "galore": {"rank": ("rank", int), "update_proj_gap": ("update_proj_gap", int), "scale": ("scale", float),
               "proj_type": ("proj_type", str)},
    "apollo": {"rank": ("rank", int), "update_proj_gap": ("update_proj_gap", int), "scale": ("scale", float),
               "scale_type": ("scale_type", str)},
    "sgd": {"momentum": ("momentum", float)},
}
OPTIM_ARGS["galore8bit"] = OPTIM_ARGS["galore"]
FIXED = {"apollo": {"proj": "random", "proj_type": "std"}}  # APOLLO as galore-bench runs it: random projections
DEFAULTS = {"galore": {"rank": 128}, "galore8bit": {"rank": 128}, "apollo": {"rank": 128}}  # transformers' defaults
USES_TARGETS = {"galore", "galore8bit", "apollo"}
SCHEDULES = {"cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def parse_optim_args(text: Any, where: str) -> dict[str, str]:
    """transformers' `optim_args` string, "rank=4,scale=0.25", as its Trainer splits it."""
    if text in (None, ""):
        return {}
    if not isinstance(text, str):
        raise UserError(f"{where}: optim_args: got {shown(text)}, allowed a string such as 'rank=4,scale=0.25'")
    pairs = [item.split("=", 1) for item in text.replace(" ", "").split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise UserError(f"{where}: optim_args: got {shown(text)}, allowed key=value pairs separated by commas")
    return {key: value for key, value in pairs}


def _optimizer(args: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The run's method and options from optim, optim_args, learning_rate, weight_decay and Adam's arguments."""
    optim = args.get("optim", "adamw_torch")
    if optim not in OPTIM_METHODS:
        raise UserError(f"{where}: optim: got {shown(optim)}, allowed one of {', '.join(OPTIM_METHODS)} "
                        "(the transformers optimizers galore-bench measures)")
    method, fixed = OPTIM_METHODS[optim]
    options: dict[str, Any] = {**DEFAULTS.get(method, {}), **fixed}
    for source, target in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
        if args.get(source) is not None:
            options[target] = float(args[source])
    if method in TAKES_ADAM_ARGS:
        for source, target in (("adam_beta1", "beta1"), ("adam_beta2", "beta2"), ("adam_epsilon", "eps")):
            if args.get(source) is not None:
                options[target] = float(args[source])
    given, known = parse_optim_args(args.get("optim_args"), where), OPTIM_ARGS.get(method)
    if given and known is None:
        raise UserError(f"{where}: optim_args: got {shown(args['optim_args'])} for optim {optim!r}, allowed "
                        "none (galore-bench maps optim_args for galore_*, apollo_* and sgd only)")
    for key, value in given.items():
        if key in FIXED.get(method, {}):
            if value != FIXED[method][key]:
                raise UserError(f"{where}: optim_args.{key}: got {value!r}, allowed {FIXED[method][key]!r} "
                                f"(galore-bench's {method})")
            continue
        if known is None or key not in known:
            allowed = ", ".join([*(known or {}), *FIXED.get(method, {})])
            raise UserError(f"{where}: optim_args.{key}: not mapped for optim {optim!r}; allowed keys: {allowed}")
        name, kind = known[key]
        try:
            options[name] = kind(value)
        except ValueError:
            raise UserError(f"{where}: optim_args.{key}: got {value!r}, allowed {kind.__name__}") from None
    return method, options


def _precision(args: dict[str, Any], dtype: str, where: str) -> dict[str, str]:
    """bf16 / fp16 flags -> mixed precision (fp32 weights, autocast), as the Trainer trains; neither: `dtype`."""
    if args.get("bf16") and args.get("fp16"):
        raise UserError(f"{where}: bf16 and fp16: got both true, allowed at most one")
    if args.get("bf16"):
        return {"precision": "bf16-mixed"}
    if args.get("fp16"):
        return {"precision": "fp16-mixed"}
    return {"dtype": dtype}


def _train(args: dict[str, Any], seq_len: int, dtype: str, where: str) -> tuple[dict[str, Any], list[str]]:
    train: dict[str, Any] = {"batch_size": int(args.get("per_device_train_batch_size", 8)), "seq_len": seq_len,
                             "grad_accum": int(args.get("gradient_accumulation_steps", 1)),
                             "activation_checkpointing": bool(args.get("gradient_checkpointing", False)),
                             **_precision(args, dtype, where)}
    notes = []
    if int(args.get("max_steps", -1)) > 0:
        train["steps"] = int(args["max_steps"])
    else:
        notes.append("max_steps not set (training by epochs): steps left at galore-bench's default")
    if isinstance(args.get("seed"), int):
        train["seed"] = args["seed"]
    schedule = args.get("lr_scheduler_type", "linear")
    train["lr_schedule"] = SCHEDULES.get(schedule, "constant")
    if schedule not in SCHEDULES:
        notes.append(f"lr_scheduler_type {schedule!r} has no counterpart: constant (a schedule changes no memory)")
    if isinstance(args.get("warmup_steps"), int) and args["warmup_steps"] > 0:
        train["warmup_steps"] = args["warmup_steps"]
    if args.get("max_grad_norm"):
        notes.append(f"max_grad_norm {args['max_grad_norm']}: not clipped here (the Trainer's norm pass holds "
                     "one fp32 scalar per parameter tensor)")
    return train, notes


def hf_match(targets: Any, name: str) -> bool:
    """transformers' `check_target_module_exists`: a string is a regex over the whole name; a list matches a name
    given whole, contained in it, or as a whole-name regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)


def target_modules(targets: Any, model: Model, where: str) -> list[str]:
    """optim_target_modules as galore-bench's suffixes of decoder-layer projections ([] = all of them).

    transformers projects every nn.Linear it matches; galore-bench projects decoder-layer nn.Linear modules. A
    selection that reaches outside the decoder layers (all-linear takes lm_head) or picks some layers and not
    others cannot be run the same way, and is refused with the modules it names."""
    if targets is None:
        raise UserError(f"{where}: optim_target_modules: got null, allowed a list of module names or a regex "
                        "(transformers requires it for GaLore and APOLLO)")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise UserError(f"{where}: optim_target_modules: got {shown(targets)}, allowed a list of strings or a regex")
    built = meta_model(model)
    linears = [n for n, m in built.named_modules() if isinstance(m, nn.Linear)]
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    chosen = [n for n in linears if all_linear or hf_match(targets, n)]
    inside = projections(built)
    if outside := [n for n in chosen if n not in inside]:
        raise UserError(f"{where}: optim_target_modules: {shown(targets)} selects {', '.join(outside[:4])} outside "
                        "the decoder layers; allowed: names or regexes of decoder-layer projections only "
                        "(galore-bench projects those and trains the rest with AdamW)")
    if not chosen:
        raise UserError(f"{where}: optim_target_modules: {shown(targets)} selects no nn.Linear of this model")
    if set(chosen) == set(inside):
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if set(projections(built, leaves)) != set(chosen):
        raise UserError(f"{where}: optim_target_modules: {shown(targets)} selects a projection in some layers and "
                        "not in others; allowed: a selection galore-bench can name by module suffix")
    return leaves


def scenario_document(args: dict[str, Any], model: str, seq_len: int, *, dtype: str = "fp32",
                      where: str = "TrainingArguments", folder: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """(scenario TOML document, notes on what has no counterpart) for one TrainingArguments dict and a model
    (a preset name or a config.json path, written relative to `folder`, where the scenario will be saved)."""
    if not isinstance(args, dict):
        raise UserError(f"{where}: got {shown(args)}, allowed a JSON object (TrainingArguments.to_json_string())")
    method, options = _optimizer(args, where)
    train, notes = _train(args, seq_len, dtype, where)
    config = Path(model).resolve()
    table = ({"config": os.path.relpath(config, (folder or Path.cwd()).resolve())} if config.suffix == ".json"
             else {"preset": model})
    run: dict[str, Any] = {"method": method, **options}
    document: dict[str, Any] = {"description": f"imported from {where} (optim {args.get('optim', 'adamw_torch')})",
                "model": table, "train": train, "device": {"mode": "auto"}, "runs": [run]}
    if method in USES_TARGETS:
        model_of_run = validated({**document, "runs": [{"method": "adamw"}]}, folder).model  # the model alone
        run["target_modules"] = target_modules(args.get("optim_target_modules"), model_of_run, where)
    return document, notes


def validated(document: dict[str, Any], folder: Path | None, name: str = "imported") -> Scenario:
    """The document as galore-bench reads it (every option checked): what `run` will see."""
    return parse_scenario(document, (folder or Path.cwd()) / f"{name}.toml")
