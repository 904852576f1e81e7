"""Q-APOLLO-Mini (arXiv 2412.05270; the APOLLO repository's llama_7b_q_apollo_mini_per_layer.sh): APOLLO-Mini on
INT8 weights, every weight updated inside backward.

The attention / MLP projections become Int8Linear (Q-GaLore's INT8 codes + fp32 group scales, stochastic
rounding at each update: optim/qgalore.py); APOLLO-Mini's rank-1, per-tensor scaled step updates them
(optim/q_apollo.py). Embeddings, norms and the LM head keep the training dtype and plain Adam, stepped layer-wise
too. Being layer-wise, it cannot accumulate gradients; an LR schedule moves both optimizers' rates.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.errors import UserError
from galore_bench.methods import apollo, qgalore
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.terms import EstimateTerms, Moment, ParamShape, StepBytes, adam_state, blocks
from galore_bench.models import Model
from galore_bench.optim.apollo import Apollo
from galore_bench.optim.layerwise import LayerwiseOptimizer
from galore_bench.optim.q_apollo import QApollo
from galore_bench.optim.qgalore import Int8Linear

SETTINGS = ("rank", "update_proj_gap", "scale", "scale_type", "scaled_gradient", "seed")


def prepare(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    """Every projection (or the run's target_modules) becomes an Int8Linear, quantized once by nearest rounding."""

    def check(qualified: str, weight: torch.Tensor) -> None:
        if weight.numel() % opts["group_size"]:
            raise UserError(f"q_apollo_mini: group_size {opts['group_size']} does not divide {qualified}'s "
                            f"{weight.numel()} values; allowed: a divisor of that size")

    return qgalore.int8_projections(model, "q_apollo_mini", opts, check)


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}
    modules = [m for m in model.modules() if isinstance(m, Int8Linear)]
    quantized = QApollo(modules, {key: opts[key] for key in SETTINGS}, rounding_seed=train.seed, **hyper)
    regular = LayerwiseOptimizer([p for p in model.parameters() if p.requires_grad],
                                 lambda groups: Apollo(groups, **hyper))
    info = {"optimizer": "galore_bench.optim.q_apollo.QApollo", "layerwise": True, "int8_weights": len(modules),
            "weight_format": f"int8 codes + fp32 scale per {opts['group_size']}", "scale_type": opts["scale_type"]}
    return qgalore.Int8WeightsTrainer(model, regular, quantized, info)


# -- estimate terms -------------------------------------------------------------------------------
def _opt(opts: dict[str, Any], key: str) -> Any:
    return opts[key] if key in opts else OPTIONS[key].default


def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """Each projection: its int8 codes (projected, trainable) and its fp32 group scales (not trained)."""
    return qgalore.layout(shape, {"group_size": _opt(opts, "group_size"), **opts})


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """APOLLO's: the projection, two low-rank moments and the limiter's fp32 norm per INT8 weight (in the
    training dtype, as the gradient it projects); Adam's two moments for the rest."""
    if not p.projected:
        return adam_state(p.numel, e)
    return apollo.state_bytes(p, {"rank": _opt(opts, "rank")}, e)


def weight_moments(step: StepBytes) -> dict[str, Moment]:
    """Inside backward, at the first INT8 weight reached (the last layer's down_proj), every layer's activations
    still saved: its gradient, then the larger of APOLLO's scaled step (the dequantized fp32 weight beside the
    step's own transients) and the stochastic re-quantization (qgalore.weight_update_bytes)."""
    first = [p for p in step.params if p.projected][-1]
    grad = blocks(first.numel * step.e)
    opts = {key: _opt(step.options, key) for key in OPTIONS}
    scaled_step = blocks(first.numel * 4) + apollo.update_temporaries(first, opts, step.e)
    update = max(scaled_step, qgalore.weight_update_bytes(first, opts, step.e))
    return {"int8_update": Moment(grad, step.saved, update)}


OPTIONS = {
    "rank": Option(int, 1, "rank r of the random projection (APOLLO-Mini: 1)", minimum=1),
    "scale": Option(float, 128.0, "alpha^2: the scaled gradient is multiplied by sqrt(scale) (APOLLO-Mini: 128)",
                    minimum=0.0),
    "scale_type": Option(str, "tensor", "one scaling factor per channel or per tensor (APOLLO-Mini: tensor)",
                         choices=("channel", "tensor")),
    "group_size": Option(int, 256, "INT8 weight quantization group (values per fp32 scale)", minimum=1),
    **{k: v for k, v in apollo.COMMON_OPTIONS.items() if k != "layerwise"},
}

METHOD = MethodDef(
    name="q_apollo_mini",
    summary="Q-APOLLO-Mini: APOLLO-Mini's rank-1 scaled step on INT8 weights (stochastic rounding), layer-wise",
    build=build,
    prepare=prepare,
    options=OPTIONS,
    supports_grad_accum=False,
    uses_rank=True,
    paper="arXiv 2412.05270",
    estimate=EstimateTerms(state_bytes=state_bytes, layout=layout, updates_in_backward=lambda opts: True,
                           update_temporaries=apollo.update_temporaries, extra_moments=weight_moments),
    model_problem=qgalore.biased_projections,
    incompatible=lambda strategy, opts: (
        f"Q-APOLLO-Mini updates each INT8 weight inside backward (no .grad to reduce); strategy {strategy} is not "
        "supported" if strategy in ("ddp", "fsdp2") else None),
)
