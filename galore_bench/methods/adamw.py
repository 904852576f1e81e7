"""AdamW (torch.optim), the full-rank baseline of both papers; optionally stepped layer-wise."""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.optim.layerwise import LayerwiseOptimizer


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def impl_flags(impl: str, params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """torch's foreach/fused switches; 'auto' picks what a GPU user gets by default (foreach on CUDA).

    A fake-tensor simulation predicts a GPU run, so it gets foreach too (with its full-size temporaries).
    """
    if impl == "auto":
        on_gpu = bool(params) and (params[0].device.type == "cuda" or is_fake(params[0]))
        return {"foreach": on_gpu}
    return {"foreach": impl == "foreach", "fused": impl == "fused"}


def layerwise_or_plain(model: torch.nn.Module, groups: list[dict[str, Any]], make, opts: dict[str, Any],
                       info: dict[str, Any]) -> Trainer:
    """One optimizer over all groups, or one per parameter stepped inside backward (layer-wise)."""
    if opts.get("layerwise"):
        info["layerwise"] = True
        return Trainer(model, LayerwiseOptimizer(groups, make), info=info)
    return Trainer(model, make(groups), info=info)


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    params = trainable(model)
    flags = impl_flags(opts["impl"], params)
    if opts.get("layerwise"):
        flags = {"foreach": False}  # one tensor per optimizer: nothing to batch
    hyper = dict(lr=opts["lr"], weight_decay=opts["weight_decay"], betas=(opts["beta1"], opts["beta2"]),
                 eps=opts["eps"], **flags)

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, **hyper)

    info = {"optimizer": "torch.optim.AdamW", "impl": next((k for k, v in flags.items() if v), "for-loop")}
    return layerwise_or_plain(model, [{"params": params}], make, opts, info)


IMPL_OPTION = Option(str, "auto", "torch AdamW implementation (auto: foreach on a GPU and in simulate, "
                     "the for-loop on a CPU)", choices=("auto", "for-loop", "foreach", "fused"))

ADAM_OPTIONS = {
    "beta1": Option(float, 0.9, "Adam beta1", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2", minimum=0.0),
    "eps": Option(float, 1e-8, "Adam epsilon", minimum=0.0),
    "layerwise": Option(bool, False, "update each weight inside backward and free its gradient at once"),
}

METHOD = MethodDef(
    name="adamw",
    summary="AdamW, full rank (torch.optim)",
    build=build,
    options={**ADAM_OPTIONS,
             "impl": IMPL_OPTION},
    paper="baseline in arXiv 2403.03507 and 2306.09782",
)
