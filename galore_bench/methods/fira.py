"""Fira (arXiv 2410.01623): GaLore's low-rank Adam plus the full-rank gradient's scaled residual.

The same split, options and projector refresh as GaLore (methods/galore.py); the state adds one scalar per
projected matrix (the norm-growth limiter's last residual norm), and each projected update builds the
full-size residual beside GaLore's projected-back update.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import layerwise_or_plain, trainable
from galore_bench.methods.galore import (
    GALORE_OPTIONS,
    REFRESH_IN_TRACE,
    GaLoreTrainer,
    incompatible,
    layout,
    projected_groups,
    projected_sizes,
    refresh_steps,
    svd_refresh,
)
from galore_bench.methods.galore import state_bytes as galore_state_bytes
from galore_bench.methods.terms import EstimateTerms, Moment, ParamShape, StepBytes, blocks
from galore_bench.optim.fira import FiraAdamW


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    groups = projected_groups(model, opts, "fira")
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}

    def make(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return FiraAdamW(param_groups, **hyper)

    info = {"optimizer": "galore_bench.optim.fira.FiraAdamW", "projected_tensors": len(groups[1]["params"]),
            "trainable_tensors": len(trainable(model))}
    return layerwise_or_plain(model, groups, make, opts, info, trainer=GaLoreTrainer)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """GaLore's (basis + two rank-r moments, or AdamW's moments) and, projected, the limiter's 0-dim norm."""
    return galore_state_bytes(p, opts, e, eight_bit=False) + (blocks(e) if p.projected else 0)


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """Projected, at the update's peak: Adam's low-rank update, three full-size matrices (the residual, the
    update's basis product and its scaled copy) and the new limiter norm (a state once the step ends).
    Regular: AdamW's two."""
    if not p.projected:
        return 2 * blocks(p.numel * e)
    moment = projected_sizes(p, opts.get("rank"), opts.get("proj_type", "std"))[1]
    return blocks(moment * e) + 3 * blocks(p.numel * e) + blocks(e)


def refresh(step: StepBytes) -> dict[str, Moment]:
    return svd_refresh(step, eight_bit=False)


METHOD = MethodDef(
    name="fira",
    summary="Fira: GaLore plus the scaled full-rank residual, with a norm-growth limiter",
    build=build,
    options={**GALORE_OPTIONS,
             "scale": Option(float, 0.25, "alpha: scale of the projected-back update (also of the subspace part "
                             "taken out of the residual)", minimum=0.0)},
    uses_rank=True,
    paper="arXiv 2410.01623",
    estimate=EstimateTerms(state_bytes=state_bytes, layout=layout, update_temporaries=update_temporaries,
                           extra_moments=refresh),
    trace_plan=REFRESH_IN_TRACE,
    periodic_steps=refresh_steps,
    incompatible=incompatible,
)
