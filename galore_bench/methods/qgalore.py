"""Q-GaLore (arXiv 2407.08296): INT8 attention / MLP weights trained by GaLore with INT4 projectors, lazy
projector refresh and 8-bit Adam states, every weight updated inside backward (layer-wise).

Embeddings, the LM head and the norms stay in the training dtype with bitsandbytes 8-bit Adam, stepped
layer-wise too (the paper's recipe). Being layer-wise, it cannot accumulate gradients; an LR schedule moves
both optimizers' rates (measure/training.lr_schedule).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from galore_bench.errors import UserError
from galore_bench.methods.base import MethodDef, Option, TracePlan, Trainer, TrainSettings
from galore_bench.methods.common import TARGETS_OPTION
from galore_bench.methods.galore import projected_sizes, refresh_steps
from galore_bench.methods.terms import (
    EstimateTerms,
    Moment,
    ParamShape,
    StepBytes,
    adam8bit_state,
    blocks,
    model_parameters,
)
from galore_bench.models import Model
from galore_bench.models.layout import projections, refuse_experts
from galore_bench.optim.galore import GaLoreAdamW8bit
from galore_bench.optim.layerwise import LayerwiseOptimizer
from galore_bench.optim.qgalore import Int8Linear, QGaLoreAdamW8bit


def int8_projections(model: torch.nn.Module, method: str, opts: dict[str, Any],
                     check: Callable[[str, torch.Tensor], None] | None = None) -> torch.nn.Module:
    """Every attention / MLP projection (derived from the architecture, or the run's target_modules) becomes an
    Int8Linear (its weight quantized once, nearest rounding); 3-D MoE experts are refused unless left out. Shared
    by the methods that keep INT8 weights (Q-GaLore, Q-APOLLO-Mini); `check(qualified name, weight)` refuses what
    the method's own quantization cannot take."""
    targets = opts.get("target_modules") or None
    refuse_experts(model, method, targets)
    for qualified in projections(model, targets):
        parent_name, _, name = qualified.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        if child.bias is not None:  # the scenario check (model_problem) refuses this first; here for direct use
            raise UserError(f"{method}: {qualified} has a bias; allowed: {biased_projections(model, targets)}")
        if check is not None:
            check(qualified, child.weight)
        setattr(parent, name, Int8Linear(child.weight, opts["group_size"]))
    return model


def prepare(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    """INT8 projections whose weight groups and INT4 projector groups divide their sizes."""

    def check(qualified: str, weight: torch.Tensor) -> None:
        rows, cols = weight.shape
        basis = min(opts["rank"], rows, cols) * min(rows, cols)  # the projector spans the shorter side
        for key, values in (("group_size", rows * cols), ("proj_group_size", basis)):
            if values % opts[key] or values % 2:
                raise UserError(f"qgalore: {key} {opts[key]} does not divide {qualified.rpartition('.')[2]}'s "
                                f"{values} values ({'weight' if key == 'group_size' else 'INT4 projector'}); "
                                "allowed: a divisor of that size")

    return int8_projections(model, "qgalore", opts, check)


def biased_projections(model: torch.nn.Module, opts_or_targets: dict[str, Any] | list[str] | None) -> str | None:
    """Why Q-GaLore cannot take this model with these targets: a projection with a bias (Int8Linear keeps INT8
    codes and group scales of a weight, and no bias: dropping one would change the model), or None."""
    targets = (opts_or_targets.get("target_modules") if isinstance(opts_or_targets, dict) else opts_or_targets) or None
    names = projections(model, targets)
    biased = [name for name in names if getattr(model.get_submodule(name), "bias", None) is not None]
    if not biased:
        return None
    free = sorted({name.rsplit(".", 1)[-1] for name in names if name not in biased})
    hint = f" (here: {', '.join(free)})" if free else ""
    return (f"projections without a bias (Int8Linear stores INT8 weights and no bias, and would drop one): "
            f"{biased[0]} has a bias ({len(biased)} such projections); set target_modules to bias-free ones{hint}")


class Int8WeightsTrainer(Trainer):
    """Two optimizers, both stepping inside backward: one per regular weight (Q-GaLore: 8-bit Adam; Q-APOLLO-Mini:
    APOLLO), one per INT8 weight (stepped by Int8Linear's backward), whose states both count."""

    def __init__(self, model: torch.nn.Module, regular: LayerwiseOptimizer, quantized: Any,
                 info: dict[str, Any]) -> None:
        super().__init__(model, regular, info=info)
        self.quantized = quantized

    def lr_groups(self) -> list[dict[str, Any]]:
        return super().lr_groups() + list(self.quantized.param_groups)

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from super().state_tensors()
        yield from self.quantized.state_tensors()


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}
    modules = [m for m in model.modules() if isinstance(m, Int8Linear)]
    settings = {key: opts[key] for key in ("rank", "update_proj_gap", "scale", "proj_group_size", "cos_threshold",
                                           "refresh_patience")}
    quantized = QGaLoreAdamW8bit(modules, settings, seed=train.seed, **hyper)
    regular = LayerwiseOptimizer([p for p in model.parameters() if p.requires_grad],
                                 lambda groups: GaLoreAdamW8bit(groups, **hyper))
    info = {"optimizer": "galore_bench.optim.qgalore.QGaLoreAdamW8bit", "layerwise": True,
            "int8_weights": len(modules), "weight_format": f"int8 codes + fp32 scale per {opts['group_size']}",
            "projector_format": f"packed int4 codes + fp32 scale per {opts['proj_group_size']}"}
    return Int8WeightsTrainer(model, regular, quantized, info)


# -- estimate terms -------------------------------------------------------------------------------
def _opt(opts: dict[str, Any], key: str) -> Any:
    """An option as the run resolves it (estimate callers may pass only some options)."""
    return opts[key] if key in opts else OPTIONS[key].default


def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """Each projection: its int8 codes (projected, trainable) and its fp32 group scales (not trained)."""
    def int8(name: str, rows: int, cols: int) -> list[ParamShape]:
        scales = (rows * cols // _opt(opts, "group_size"),)
        return [ParamShape(name, (rows, cols), projected=True, value_bytes=1),
                ParamShape(f"{name}.scales", scales, trainable=False, value_bytes=4)]
    return model_parameters(shape, int8, opts.get("target_modules") or None)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """INT4 projector (half a byte per value + fp32 scales) and 8-bit low-rank moments; 8-bit Adam elsewhere,
    each regular weight's own optimizer with its own pair of bitsandbytes maps (layer-wise)."""
    if not p.projected:
        return adam8bit_state(p.numel)
    projector, moment = projected_sizes(p, _opt(opts, "rank"))
    return blocks(projector // 2) + blocks(projector // _opt(opts, "proj_group_size") * 4) + adam8bit_state(moment)


def weight_update_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """One INT8 weight's update at its largest moment, stochastic rounding: the dequantized fp32 weight (scaled
    in place), the fp32 uniform noise and the new group scales (traced equal in tests/test_qgalore.py)."""
    return 2 * blocks(p.numel * 4) + blocks(p.numel // _opt(opts, "group_size") * 4)


def svd_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """A refresh: the fp32 copy of the gradient (none in fp32 training) while the SVD's U, S and Vh exist, or
    U, S, Vh and the new fp32 basis once that copy is gone, whichever is more."""
    rows, cols = p.shape
    k = min(rows, cols)
    projector, _ = projected_sizes(p, _opt(opts, "rank"))
    factors = blocks(rows * k * 4) + blocks(k * 4) + blocks(k * cols * 4)
    return factors + max(blocks(rows * cols * 4) if e < 4 else 0, blocks(projector * 4))


def weight_moments(step: StepBytes) -> dict[str, Moment]:
    """Inside backward, at the first INT8 weight reached (the last layer's last projection: LLaMA's down_proj),
    every layer's activations still saved: its gradient plus the update's or the refresh's transients."""
    first = [p for p in step.params if p.projected][-1]
    grad = blocks(first.numel * step.e)
    return {"int8_update": Moment(grad, step.saved, weight_update_bytes(first, step.options, step.e)),
            "svd_refresh": Moment(grad, step.saved, svd_bytes(first, step.options, step.e))}


OPTIONS = {
    "rank": Option(int, 128, "rank r of the gradient projection", minimum=1),
    "update_proj_gap": Option(int, 200, "steps between projector refresh checks", minimum=1),
    "scale": Option(float, 0.25, "alpha: scale of the projected-back update", minimum=0.0),
    "group_size": Option(int, 256, "INT8 weight quantization group (values per fp32 scale)", minimum=1),
    "proj_group_size": Option(int, 256, "INT4 projector quantization group", minimum=2),
    "cos_threshold": Option(float, 0.4, "mean |cosine| of successive projectors that counts as agreement",
                            minimum=0.0),
    "refresh_patience": Option(int, 5, "successive agreements after which a projector is no longer refreshed",
                               minimum=1),
    "beta1": Option(float, 0.9, "Adam beta1", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2", minimum=0.0),
    "eps": Option(float, 1e-8, "Adam epsilon", minimum=0.0),
    "target_modules": TARGETS_OPTION,
}

METHOD = MethodDef(
    name="qgalore",
    summary="Q-GaLore: INT8 weights, INT4 projectors, lazy refresh, 8-bit states, layer-wise",
    build=build,
    prepare=prepare,
    options=OPTIONS,
    supports_grad_accum=False,
    uses_rank=True,
    paper="arXiv 2407.08296",
    estimate=EstimateTerms(state_bytes=state_bytes, layout=layout, updates_in_backward=lambda opts: True,
                           shared_state_bytes=lambda opts: 0, extra_moments=weight_moments),
    trace_plan=TracePlan("svd_refresh", lambda opts: {**opts, "update_proj_gap": 2}),
    periodic_steps=refresh_steps,
    model_problem=biased_projections,
    incompatible=lambda strategy, opts: (
        f"Q-GaLore updates each INT8 weight inside backward (no .grad to reduce); strategy {strategy} is not "
        "supported" if strategy in ("ddp", "fsdp2") else None),
)
