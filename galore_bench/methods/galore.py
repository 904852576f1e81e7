"""GaLore (arXiv 2403.03507): attention and MLP matrices get low-rank projected Adam, the rest plain AdamW.

Two registry entries share this adapter: `galore` (states in the model dtype, BF16 in the paper) and
`galore8bit` (bitsandbytes 8-bit states in the subspace); both can step layer-wise inside backward.
Every `update_proj_gap` steps each projector is refreshed from an SVD: simulate traces one such step,
throughput times those steps apart, and the estimate has a moment for them.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, TracePlan, Trainer
from galore_bench.methods.common import LAYERWISE_OPTION, TARGETS_OPTION, layerwise_or_plain, trainable
from galore_bench.methods.terms import (
    EstimateTerms,
    Moment,
    ParamShape,
    StepBytes,
    adam8bit_state,
    adam_state,
    blocks,
    model_parameters,
)
from galore_bench.models import Model
from galore_bench.models.layout import projections, refuse_experts
from galore_bench.optim.galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreProjector
from galore_bench.optim.projector import SVD_OVERSAMPLE, SVD_POWER_ITERS


def projected_groups(model: torch.nn.Module, opts: dict[str, Any], method: str = "galore") -> list[dict[str, Any]]:
    """The paper's split: the weight of every projection of attention and MLP (q,k,v,o,gate,up,down in LLaMA;
    derived from the architecture, or the run's target_modules) projected; embeddings, norms, biases, head not.
    3-D MoE experts are refused unless target_modules leaves them to plain AdamW."""
    targets = opts.get("target_modules") or None
    refuse_experts(model, method, targets)
    weights = {id(model.get_submodule(name).weight) for name in projections(model, targets)}
    projected: list[torch.nn.Parameter] = []
    regular: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (projected if id(param) in weights else regular).append(param)
    galore = {key: opts[key] for key in ("rank", "update_proj_gap", "scale", "proj_type", "svd", "svd_oversample",
                                         "svd_power_iters")}
    return [{"params": regular}, {"params": projected, **galore}]


class GaLoreTrainer(Trainer):
    """The optimizer's state also holds each projector's basis, kept on the projector object."""

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from super().state_tensors()
        for state in self.optimizer.state.values():
            projector = state.get("projector")
            if isinstance(projector, GaLoreProjector) and projector.ortho_matrix is not None:
                yield projector.ortho_matrix


def _build(model: torch.nn.Module, opts: dict[str, Any], eight_bit: bool) -> Trainer:
    groups = projected_groups(model, opts, "galore8bit" if eight_bit else "galore")
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}
    kind = GaLoreAdamW8bit if eight_bit else GaLoreAdamW

    def make(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return kind(param_groups, **hyper)

    info = {"optimizer": f"galore_bench.optim.galore.{kind.__name__}", "projected_tensors": len(groups[1]["params"]),
            "trainable_tensors": len(trainable(model))}
    return layerwise_or_plain(model, groups, make, opts, info, trainer=GaLoreTrainer)


# -- estimate terms -------------------------------------------------------------------------------
def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    return model_parameters(shape, lambda name, rows, cols: [ParamShape(name, (rows, cols), projected=True)],
                            opts.get("target_modules") or None)


def projected_side(p: ParamShape, proj_type: str = "std") -> str:
    """'left' (basis rows x r) or 'right' (r x cols): std projects the shorter side, like the optimizer."""
    tall = p.shape[0] >= p.shape[1]
    if proj_type in ("left", "right"):
        return proj_type
    return ("right" if tall else "left") if proj_type == "std" else ("left" if tall else "right")


def projected_sizes(p: ParamShape, rank: int | None, proj_type: str = "std") -> tuple[int, int]:
    """(projector, one moment) elements of a GaLore matrix."""
    rows, cols = p.shape
    r = min(rank or 0, rows, cols)
    return (r * cols, rows * r) if projected_side(p, proj_type) == "right" else (rows * r, r * cols)


def _sizes(p: ParamShape, opts: dict[str, Any]) -> tuple[int, int]:
    return projected_sizes(p, opts.get("rank"), opts.get("proj_type", "std"))


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int, eight_bit: bool) -> int:
    """Table 1's m*r projector (gradient dtype) + 2*n*r moments (m <= n); plain Adam moments for the rest."""
    if not p.projected:
        return adam8bit_state(p.numel) if eight_bit else adam_state(p.numel, e)
    projector, moments = _sizes(p, opts)
    return blocks(projector * e) + (adam8bit_state(moments) if eight_bit else adam_state(moments, e))


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int, eight_bit: bool) -> int:
    """Projected: the low-rank gradient and Adam's ratio (written over its denominator; 8-bit: the kernel's
    update buffer), then one full-size matrix, projected back (the scale goes into the add: add_back).
    Regular: AdamW's ratio, written over its denominator (the 8-bit kernel updates in place)."""
    if not p.projected:
        return 0 if eight_bit else blocks(p.numel * e)
    return 2 * blocks(_sizes(p, opts)[1] * e) + blocks(p.numel * e)


def svd_refresh_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """One projector refresh: the randomized range finder's where its sketch is narrower than the matrix
    (else range_finder.py takes the exact SVD too), the full SVD's otherwise."""
    sketch_width = opts.get("rank", 0) + opts.get("svd_oversample", SVD_OVERSAMPLE)
    if opts.get("svd", "full") == "randomized" and sketch_width < min(p.shape):
        return randomized_refresh_bytes(p, opts, e)
    return full_svd_refresh_bytes(p, opts, e)


def full_svd_refresh_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """The gradient in fp32, the SVD's U, S and Vh, the new basis and the projected gradient."""
    rows, cols = p.shape
    k = min(rows, cols)
    projector, moment = _sizes(p, opts)
    return ((blocks(rows * cols * 4) if e < 4 else 0) + blocks(rows * k * 4) + blocks(k * 4) + blocks(k * cols * 4)
            + blocks(projector * e) + blocks(moment * e))


def randomized_refresh_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """range_finder.py's peak, traced: the fp32 gradient, the sketch (other side x w, held throughout),
    the basis (kept side x w), an R or small U (w x w), and the larger of the small SVD's moment (basis^T G
    and its Vh, both w x other, and S) and a QR's (G @ basis and its Q). The new basis comes after."""
    rows, cols = p.shape
    right = projected_side(p, opts.get("proj_type", "std")) == "right"
    kept, other = (cols, rows) if right else (rows, cols)
    width = opts.get("rank", 0) + opts.get("svd_oversample", SVD_OVERSAMPLE)
    sketch, basis, square = blocks(other * width * 4), blocks(kept * width * 4), blocks(width * width * 4)
    small_svd = 2 * sketch + blocks(width * 4)
    # a power iteration's QR: G @ basis and its Q; without one, only the first sketch's G @ sketch and its Q
    qr = (2 if opts.get("svd_power_iters", SVD_POWER_ITERS) > 0 else 1) * basis
    return (blocks(rows * cols * 4) if e < 4 else 0) + sketch + basis + square + max(small_svd, qr)


def svd_refresh(step: StepBytes, eight_bit: bool) -> dict[str, Moment]:
    """Every update_proj_gap steps, the SVDs that refresh the projectors."""
    e, opts = step.e, step.options
    projected = [p for p in step.params if p.projected]
    if step.layerwise:  # inside backward, at the first projected weight reached: the last layer's last (down_proj)
        first = projected[-1]
        return {"svd_refresh": Moment(blocks(first.numel * e), step.saved, svd_refresh_bytes(first, opts, e))}
    # each refresh runs while the previous weight's update is still referenced: before the first, the LM head's
    # AdamW ratio (the 8-bit kernel updates the head in place: nothing); before the others, the previous
    # projected weight's low-rank ratio (8-bit: its low-rank gradient and update buffer)
    leftovers = [0 if eight_bit else step.head_gradient]
    leftovers += [(2 if eight_bit else 1) * blocks(_sizes(p, opts)[1] * e) for p in projected[:-1]]
    largest = max(svd_refresh_bytes(p, opts, e) + left for p, left in zip(projected, leftovers))
    return {"svd_refresh": Moment(step.gradients, 0, largest)}


def _terms(eight_bit: bool) -> EstimateTerms:
    return EstimateTerms(state_bytes=partial(state_bytes, eight_bit=eight_bit), layout=layout,
                         update_temporaries=partial(update_temporaries, eight_bit=eight_bit),
                         extra_moments=partial(svd_refresh, eight_bit=eight_bit))


# -- the refresh step in simulate, throughput and distributed runs ---------------------------------
REFRESH_IN_TRACE = TracePlan("svd_refresh", lambda opts: {**opts, "update_proj_gap": 2})


def refresh_steps(opts: dict[str, Any], steps: int) -> dict[str, set[int]]:
    """Step 0 (the first SVD, state creation) is warm-up either way."""
    return {"svd_refresh": {i for i in range(1, steps) if i % opts["update_proj_gap"] == 0}}


def incompatible(strategy: str, opts: dict[str, Any]) -> str | None:
    if strategy == "fsdp2":
        return ("GaLore takes the SVD of each whole gradient matrix, but FSDP2 hands the optimizer row shards: "
                "every rank would all-gather each full matrix (no memory saved); use strategy ddp")
    return None


GALORE_OPTIONS = {
    "rank": Option(int, 128, "rank r of the gradient projection", minimum=1),
    "update_proj_gap": Option(int, 200, "steps T between SVD refreshes of the projector", minimum=1),
    "scale": Option(float, 0.25, "alpha: scale of the projected-back update", minimum=0.0),
    "proj_type": Option(str, "std", "which side to project", choices=("std", "reverse_std", "left", "right")),
    "beta1": Option(float, 0.9, "Adam beta1", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2", minimum=0.0),
    "eps": Option(float, 1e-6, "Adam epsilon (the galore-torch default; the paper prints 1e-8)", minimum=0.0),
    "layerwise": LAYERWISE_OPTION,
    "svd": Option(str, "full", "projector refresh: the 'full' SVD (the paper's; galore-torch's update bit for bit) "
                  "or a 'randomized' range finder (cheaper at large shapes)", choices=("full", "randomized")),
    "svd_oversample": Option(int, SVD_OVERSAMPLE, "randomized refresh: sketch columns beyond the rank", minimum=0),
    "svd_power_iters": Option(int, SVD_POWER_ITERS, "randomized refresh: power iterations that sharpen the sketch",
                              minimum=0),
    "target_modules": TARGETS_OPTION,
}

METHOD = MethodDef(
    name="galore",
    summary="GaLore: Adam in a low-rank gradient subspace (states in the model dtype)",
    build=lambda model, opts, train: _build(model, opts, eight_bit=False),
    options=GALORE_OPTIONS,
    uses_rank=True,
    paper="arXiv 2403.03507",
    estimate=_terms(eight_bit=False),
    trace_plan=REFRESH_IN_TRACE,
    periodic_steps=refresh_steps,
    incompatible=incompatible,
)

METHOD_8BIT = MethodDef(
    name="galore8bit",
    summary="8-bit GaLore: bitsandbytes 8-bit Adam states in the low-rank subspace",
    build=lambda model, opts, train: _build(model, opts, eight_bit=True),
    options={**GALORE_OPTIONS, "eps": Option(float, 1e-8, "Adam epsilon", minimum=0.0)},
    uses_rank=True,
    paper="arXiv 2403.03507, Sec. 5.5",
    estimate=_terms(eight_bit=True),
    trace_plan=REFRESH_IN_TRACE,
    periodic_steps=refresh_steps,
    incompatible=incompatible,
)
