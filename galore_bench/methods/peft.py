"""Any adapter peft ships (IA3, LoHa, LoKr, VeRA, BOFT, OFT, HRA, FourierFT, LoRA, ...), configured as peft is.

The run's [runs.peft] table is peft's own config: `type` names the PeftType, every other key is a field of that
type's config class. The projections to adapt default to every 2-D projection of the decoder layers (the lora
method's choice, read off the architecture), set by the run's `target_modules`. The table is checked when the
scenario loads, by building peft's config and applying it to the model on the meta device, so a typo or an option
peft refuses is one line of the scenario's problems, not a traceback in a run's process.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from galore_bench.methods.adapters import (
    ADAPTER_DTYPE_OPTION,
    TRAIN_NON_ADAPTER_OPTION,
    adamw_of_trainable,
    adapted_projections,
    wrap_adapters,
)
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import IMPL_OPTION, TARGETS_OPTION
from galore_bench.models import build_model

PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT",
                   "CPT", "XLORA", "POLY")
"""Types refused: the prompt-learning ones prepend virtual tokens (the sequence, the labels and the attention mask
the engines build change); X-LoRA and Poly route between several adapters, which need a classifier or task ids."""
SET_HERE = ("task_type", "peft_type", "target_modules")
"""Fields the suite sets: a causal LM, the type from `type`, the targets from the run's target_modules."""


def _types() -> dict[str, Any]:
    """PeftType name -> its config class, for the types this method runs."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(t.value): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if t.value not in PROMPT_LEARNING}


def _fields(config_class: Any) -> list[str]:
    """The fields of the type's own config (PeftConfig's: the hub's bookkeeping, inference_mode, left out)."""
    from peft.config import PeftConfig

    bookkeeping = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.init and f.name not in bookkeeping]


def mlp_outputs(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The targets that are an MLP's output projection (down_proj in LLaMA, Phi-3, Gemma): a linear layer under
    `.mlp.` that maps back to the hidden size. IA3 scales their input (the wide activation), the others' output."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    modules = dict(model.named_modules())
    return [name for name in targets if ".mlp." in name and isinstance(modules.get(name), torch.nn.Linear)
            and modules[name].out_features == hidden]


def peft_config(table: dict[str, Any], model: torch.nn.Module | None, target_modules: list[str]) -> Any:
    """peft's config object for the table, targets and (IA3) feed-forward modules derived from the model unless
    the table sets them (peft's ValueError or TypeError when it refuses the values)."""
    config_class = _types()[str(table["type"]).upper()]
    options = {k: v for k, v in table.items() if k != "type"}
    fields = _fields(config_class)
    if "target_modules" in fields:
        options["target_modules"] = target_modules
    if "feedforward_modules" in fields and "feedforward_modules" not in table and model is not None:
        options["feedforward_modules"] = mlp_outputs(model, target_modules)
    return config_class(task_type="CAUSAL_LM", **options)


def peft_problems(opts: dict[str, Any], model: Any) -> list[tuple[str, str, str]]:
    """What peft would refuse in the run's table, as (field, got, allowed): the type, unknown fields, the
    config's own checks, and applying it to the model (on the meta device: no memory, any size)."""
    table = opts.get("peft")
    if not isinstance(table, dict):
        return []  # its type is reported with the option's own check
    types = _types()
    kind = table.get("type")
    if not isinstance(kind, str) or kind.upper() not in types:
        return [("peft.type", str(kind) if kind is not None else "not set",
                 "a PeftType name: one of " + ", ".join(sorted(types)) + " (refused: " + ", ".join(PROMPT_LEARNING)
                 + ": virtual tokens or routing between adapters)")]
    config_class = types[kind.upper()]
    allowed = [f for f in _fields(config_class) if f not in SET_HERE]
    problems = [(f"peft.{key}", key, f"a field of peft's {config_class.__name__}: " + ", ".join(allowed))
                for key in table if key not in ("type", "target_modules", *allowed)]
    problems += [("peft.target_modules", str(table[key]), ("set on the run: runs[i].target_modules (suffixes checked "
                  "against the model, as for every projection method)")) for key in table if key == "target_modules"]
    if problems:
        return problems
    try:
        peft_config(table, None, ["q_proj"])  # a placeholder: the model's own targets are checked below
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, or what a hostile value makes peft raise
        return [("peft", str(table), f"a config peft's {config_class.__name__} accepts; peft says: {exc}")]
    if model is None:
        return []
    return _applies(table, config_class.__name__, opts, model)


def _applies(table: dict[str, Any], config_name: str, opts: dict[str, Any], model: Any) -> list[tuple[str, str, str]]:
    """Apply the config to the model on the meta device: peft's checks that need the layers (shapes, block sizes)."""
    import peft

    built = build_model(model, "bf16", "meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's advice (a block size it adjusted) is not a problem
            targets = adapted_projections(built, opts, "peft")
            peft.get_peft_model(built, peft_config(table, built, targets))
    except Exception as exc:  # noqa: BLE001 - whatever peft raises on this model is the table's problem
        return [("peft", str(table), (f"a {config_name} peft can apply to this model; peft says: "
                 f"{type(exc).__name__}: {exc}"))]
    return []


def prepare(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    config = peft_config(opts["peft"], model, adapted_projections(model, opts, "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wrap_adapters(model, config, train_non_adapter=opts["train_non_adapter"],
                             fp32_adapters=opts["adapter_dtype"] == "fp32")


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    return Trainer(model, adamw_of_trainable(model, opts),
                   info={"optimizer": "torch.optim.AdamW", "adapters": f"peft {str(opts['peft']['type']).upper()}"})


METHOD = MethodDef(
    name="peft", summary="any peft adapter (IA3, LoHa, LoKr, VeRA, BOFT, ...) from a [runs.peft] config table",
    build=build, prepare=prepare, check=peft_problems, paper="peft: https://github.com/huggingface/peft",
    options={
        "peft": Option(dict, {}, "peft's config: type = a PeftType name (\"IA3\", \"LOHA\", \"LOKR\", \"VERA\", "
                       "\"BOFT\", ...) and that type's config fields, e.g. r = 8"),
        "target_modules": TARGETS_OPTION,
        "adapter_dtype": ADAPTER_DTYPE_OPTION,
        "train_non_adapter": TRAIN_NON_ADAPTER_OPTION,
        "impl": IMPL_OPTION,
    },
    no_estimate_reason="what peft's adapters keep and save for backward differs with every type; the lora method "
                       "(use_dora too) has closed-form terms, any peft type runs in simulate and measure")
