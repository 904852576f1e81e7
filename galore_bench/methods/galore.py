"""GaLore (arXiv 2403.03507): attention and MLP matrices get low-rank projected Adam, the rest plain AdamW.

Two registry entries share this adapter: `galore` (states in the model dtype, BF16 in the paper) and
`galore8bit` (bitsandbytes 8-bit states in the subspace); both can step layer-wise inside backward.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.adamw import layerwise_or_plain, trainable
from galore_bench.methods.base import MethodDef, Option, Trainer
from galore_bench.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from galore_bench.optim.lowrank import DEFAULT_TARGETS


def projected_groups(model: torch.nn.Module, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's split: every 2-D weight of q,k,v,o,gate,up,down projected; embeddings, norms, head not."""
    projected: list[torch.nn.Parameter] = []
    regular: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        (projected if param.ndim == 2 and module in DEFAULT_TARGETS else regular).append(param)
    galore = {"rank": opts["rank"], "update_proj_gap": opts["update_proj_gap"], "scale": opts["scale"],
              "proj_type": opts["proj_type"]}
    return [{"params": regular}, {"params": projected, **galore}]


def _build(model: torch.nn.Module, opts: dict[str, Any], eight_bit: bool) -> Trainer:
    groups = projected_groups(model, opts)
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}
    kind = GaLoreAdamW8bit if eight_bit else GaLoreAdamW

    def make(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return kind(param_groups, **hyper)

    info = {"optimizer": f"galore_bench.optim.galore.{kind.__name__}", "projected_tensors": len(groups[1]["params"]),
            "trainable_tensors": len(trainable(model))}
    return layerwise_or_plain(model, groups, make, opts, info)


GALORE_OPTIONS = {
    "rank": Option(int, 128, "rank r of the gradient projection", minimum=1),
    "update_proj_gap": Option(int, 200, "steps T between SVD refreshes of the projector", minimum=1),
    "scale": Option(float, 0.25, "alpha: scale of the projected-back update", minimum=0.0),
    "proj_type": Option(str, "std", "which side to project", choices=("std", "reverse_std", "left", "right")),
    "beta1": Option(float, 0.9, "Adam beta1", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2", minimum=0.0),
    "eps": Option(float, 1e-6, "Adam epsilon (the galore-torch default; the paper prints 1e-8)", minimum=0.0),
    "layerwise": Option(bool, False, "update each weight inside backward and free its gradient at once"),
}

METHOD = MethodDef(
    name="galore",
    summary="GaLore: Adam in a low-rank gradient subspace (states in the model dtype)",
    build=lambda model, opts, train: _build(model, opts, eight_bit=False),
    options=GALORE_OPTIONS,
    uses_rank=True,
    paper="arXiv 2403.03507",
)

METHOD_8BIT = MethodDef(
    name="galore8bit",
    summary="8-bit GaLore: bitsandbytes 8-bit Adam states in the low-rank subspace",
    build=lambda model, opts, train: _build(model, opts, eight_bit=True),
    options={**GALORE_OPTIONS, "eps": Option(float, 1e-8, "Adam epsilon", minimum=0.0)},
    uses_rank=True,
    paper="arXiv 2403.03507, Sec. 5.5",
)
