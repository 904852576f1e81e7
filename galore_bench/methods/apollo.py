"""APOLLO and APOLLO-Mini (arXiv 2412.05270): AdamW whose learning rates are scaled per channel (APOLLO) or per
tensor (APOLLO-Mini, rank 1), estimated from low-rank Adam moments in a seeded random projection.

Two registry entries share this adapter; both can step layer-wise inside backward. The attention and MLP matrices
are projected (GaLore's split), embeddings, norms and the LM head get plain Adam. A projection refresh draws
r x n Gaussian numbers (no SVD): too small to need a traced refresh step.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer
from galore_bench.methods.common import LAYERWISE_OPTION, TARGETS_OPTION, layerwise_or_plain, trainable
from galore_bench.methods.terms import EstimateTerms, ParamShape, adam_state, blocks, model_parameters
from galore_bench.models import Model
from galore_bench.models.layout import projections, refuse_experts
from galore_bench.optim.apollo import SCALE_TYPES, SCALED_GRADIENTS, Apollo

PROJECTED_KEYS = ("rank", "update_proj_gap", "scale", "scale_type", "scaled_gradient")


def apollo_groups(model: torch.nn.Module, opts: dict[str, Any], method: str = "apollo") -> list[dict[str, Any]]:
    """Plain Adam for the rest; one group per projected matrix (the decoder layers' projections, or the run's
    target_modules), each with its own projection seed (so that same-shaped matrices, and layer-wise stepping's
    one-parameter optimizers, never share a projection). 3-D MoE experts are refused unless left out."""
    targets = opts.get("target_modules") or None
    refuse_experts(model, method, targets)
    weights = {id(model.get_submodule(name).weight) for name in projections(model, targets)}
    regular: list[torch.nn.Parameter] = []
    projected: list[dict[str, Any]] = []
    settings = {key: opts[key] for key in PROJECTED_KEYS}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in weights:
            projected.append({"params": [param], **settings, "seed": opts["seed"] + len(projected)})
        else:
            regular.append(param)
    return [{"params": regular}, *projected]


def _build(model: torch.nn.Module, opts: dict[str, Any], method: str) -> Trainer:
    groups = apollo_groups(model, opts, method)
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}

    def make(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return Apollo(param_groups, **hyper)

    info = {"optimizer": "galore_bench.optim.apollo.Apollo", "projected_tensors": len(groups) - 1,
            "trainable_tensors": len(trainable(model)), "scale_type": opts["scale_type"],
            "scaled_gradient": opts["scaled_gradient"]}
    return layerwise_or_plain(model, groups, make, opts, info)


# -- estimate terms -------------------------------------------------------------------------------
def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    return model_parameters(shape, lambda name, rows, cols: [ParamShape(name, (rows, cols), projected=True)],
                            opts.get("target_modules") or None)


def _sides(p: ParamShape, opts: dict[str, Any]) -> tuple[int, int, int]:
    """(kept side, projected side, r): the projection keeps the longer side (rows when rows >= cols)."""
    rows, cols = p.shape
    kept, other = (rows, cols) if rows >= cols else (cols, rows)
    return kept, other, opts["rank"]


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """Projected: the r x other projection, two kept x r moments (model dtype) and the fp32 previous norm
    of the limiter; the rest: Adam's two moments (the step count is a Python int)."""
    if not p.projected:
        return adam_state(p.numel, e)
    kept, other, r = _sides(p, opts)
    return blocks(r * other * e) + adam_state(kept * r, e) + blocks(4)


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """The largest transient of one parameter's update, as traced. Plain Adam: its denominator (the quotient is
    written into it). Projected: R and R~ (kept x r) throughout; the ratios' moment adds three kept-long vectors
    (two norms and their quotient; 0-dim per tensor); then one ratio vector stays with the full-size scaled
    gradient ('full': beside the limiter's 0-dim norms, an fp32 copy of the norm below fp32, its shifted previous
    value and their quotient; 'projected': beside the limiter, as R~ * s is mapped back to full size)."""
    if not p.projected:
        return blocks(p.numel * e)
    kept, _, r = _sides(p, opts)
    low = 2 * blocks(kept * r * e)
    vector = blocks(kept * e) if opts["scale_type"] == "channel" else blocks(e)
    scalar = blocks(4)
    limiter = (3 + (e < 4)) * scalar if opts["scaled_gradient"] == "full" else scalar
    return low + max(3 * vector, vector + blocks(p.numel * e) + limiter)


def incompatible(strategy: str, opts: dict[str, Any]) -> str | None:
    if strategy == "fsdp2":
        return ("APOLLO's scaling norms span whole rows, columns or the whole matrix, but FSDP2 hands the optimizer "
                "row shards: each rank would scale its shard by its own norms; use strategy ddp")
    return None


TERMS = EstimateTerms(state_bytes=state_bytes, layout=layout, update_temporaries=update_temporaries)

COMMON_OPTIONS = {
    "update_proj_gap": Option(int, 200, "steps T between redraws of the random projection", minimum=1),
    "beta1": Option(float, 0.9, "Adam beta1 (low-rank moments)", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2 (low-rank moments)", minimum=0.0),
    "eps": Option(float, 1e-6, "Adam epsilon", minimum=0.0),
    "seed": Option(int, 0, "seed of the random projections (matrix i uses seed + i)", minimum=0),
    "scaled_gradient": Option(str, "full", "what the scaling factor multiplies: the 'full'-rank gradient (the "
                              "paper's Algorithm 1) or the 'projected' one, mapped back (pytorch-optimizer's)",
                              choices=SCALED_GRADIENTS),
    "layerwise": LAYERWISE_OPTION,
    "target_modules": TARGETS_OPTION,
}

METHOD = MethodDef(
    name="apollo",
    summary="APOLLO: AdamW with channel-wise learning-rate scaling from low-rank random-projection moments",
    build=lambda model, opts, train: _build(model, opts, "apollo"),
    options={"rank": Option(int, 256, "rank r of the random projection", minimum=1),
             "scale": Option(float, 1.0, "alpha^2: the scaled gradient is multiplied by sqrt(scale)", minimum=0.0),
             "scale_type": Option(str, "channel", "one scaling factor per channel or per tensor", choices=SCALE_TYPES),
             **COMMON_OPTIONS},
    uses_rank=True,
    paper="arXiv 2412.05270",
    estimate=TERMS,
    incompatible=incompatible,
)

METHOD_MINI = MethodDef(
    name="apollo_mini",
    summary="APOLLO-Mini: rank-1 random projection, one learning-rate scale per tensor (SGD-like memory)",
    build=lambda model, opts, train: _build(model, opts, "apollo_mini"),
    options={"rank": Option(int, 1, "rank r of the random projection (the paper's Mini: 1)", minimum=1),
             "scale": Option(float, 128.0, "alpha^2: the scaled gradient is multiplied by sqrt(scale) (the "
                             "paper's Mini: 128)", minimum=0.0),
             "scale_type": Option(str, "tensor", "one scaling factor per channel or per tensor", choices=SCALE_TYPES),
             **COMMON_OPTIONS},
    uses_rank=True,
    paper="arXiv 2412.05270",
    estimate=TERMS,
    incompatible=incompatible,
)
