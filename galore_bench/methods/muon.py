"""Muon (torch.optim.Muon): momentum orthogonalised by Newton-Schulz iterations on the hidden 2-D matrices (the
attention and MLP projections), AdamW on the rest (embeddings, LM head, norms): the standard split.

Both are torch's own optimizers, stepped one after the other (optim/chained.py). Muon keeps one momentum buffer
per matrix (half of Adam's state); its update makes a bf16 copy of the Nesterov momentum and a few small Gram
matrices.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import IMPL_OPTION, TARGETS_OPTION, adamw_impl, adamw_state, impl_flags, trainable
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks, model_parameters
from galore_bench.models import Model
from galore_bench.models.layout import projections, refuse_experts
from galore_bench.optim.chained import ChainedOptimizer


def split(model: torch.nn.Module, targets: list[str] | None = None
          ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden 2-D matrices for Muon: the decoder layers' projections or the run's target_modules, everything
    else for AdamW). 3-D MoE experts are refused unless target_modules leaves them to AdamW."""
    refuse_experts(model, "muon", targets)
    weights = {id(model.get_submodule(name).weight) for name in projections(model, targets)}
    hidden: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (hidden if id(param) in weights else rest).append(param)
    return hidden, rest


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    hidden, rest = split(model, opts.get("target_modules") or None)
    muon = torch.optim.Muon(hidden, lr=opts["lr"], weight_decay=opts["weight_decay"], momentum=opts["momentum"],
                            nesterov=opts["nesterov"], ns_steps=opts["ns_steps"], adjust_lr_fn=opts["adjust_lr_fn"])
    flags = impl_flags(opts["impl"], rest)
    adamw = torch.optim.AdamW(rest, lr=opts["adamw_lr"], weight_decay=opts["weight_decay"],
                              betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"], **flags)
    info = {"optimizer": "torch.optim.Muon + torch.optim.AdamW", "muon_tensors": len(hidden),
            "adamw_tensors": len(rest), "trainable_tensors": len(trainable(model)),
            "adamw_impl": next((k for k, v in flags.items() if v), "for-loop")}
    return Trainer(model, ChainedOptimizer(muon, adamw), info=info)


# -- estimate terms -------------------------------------------------------------------------------
def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """The hidden matrices marked 'projected' (here: stepped by Muon)."""
    return model_parameters(shape, lambda name, rows, cols: [ParamShape(name, (rows, cols), projected=True)],
                            opts.get("target_modules") or None)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """Muon: one momentum buffer in the model dtype; AdamW: two moments and the fp32 step."""
    return blocks(p.numel * e) if p.projected else adamw_state(p, opts, e)


def muon_temporaries(p: ParamShape, e: int) -> int:
    """One Newton-Schulz update, as traced: the Nesterov momentum (model dtype) stays referenced throughout; each
    iteration makes the next bf16 iterate (full size) beside the previous one (in bf16 the first is the momentum
    itself, else its bf16 copy), with the k x k Gram matrix and its update (bf16, k the shorter side)."""
    k = min(p.shape)
    return blocks(p.numel * e) + 2 * blocks(p.numel * 2) + 2 * blocks(k * k * 2)


def adamw_temporaries(p: ParamShape, e: int) -> int:
    """The for-loop AdamW: sqrt(v) and the denominator, two full-size tensors."""
    return 2 * blocks(p.numel * e)


def whole_update(trainable_params: list[ParamShape], opts: dict[str, Any], e: int, layerwise: bool,
                 target: str) -> int:
    """Muon steps first (one matrix at a time), then AdamW (foreach: sqrt(v) of all its parameters at once)."""
    muon = max((muon_temporaries(p, e) for p in trainable_params if p.projected), default=0)
    rest = [p for p in trainable_params if not p.projected]
    impl = adamw_impl(opts, target, layerwise)
    if impl == "foreach":
        adamw = sum(blocks(p.numel * e) for p in rest)
    elif impl == "fused":
        adamw = 0
    else:
        adamw = max((adamw_temporaries(p, e) for p in rest), default=0)
    return max(muon, adamw)


METHOD = MethodDef(
    name="muon",
    summary="Muon (torch.optim.Muon) on the hidden matrices, AdamW on embeddings, LM head and norms",
    build=build,
    options={
        "adamw_lr": Option(float, 1e-3, "AdamW's learning rate (embeddings, LM head, norms); `lr` is Muon's",
                           minimum=0.0),
        "momentum": Option(float, 0.95, "Muon momentum", minimum=0.0),
        "nesterov": Option(bool, True, "Muon: Nesterov momentum"),
        "ns_steps": Option(int, 5, "Muon: Newton-Schulz iterations", minimum=1),
        "adjust_lr_fn": Option(str, "original", "Muon's per-shape learning-rate adjustment ('original': "
                               "sqrt(max(1, rows/cols)); 'match_rms_adamw': 0.2 sqrt(max(rows, cols)))",
                               choices=("original", "match_rms_adamw")),
        "beta1": Option(float, 0.9, "AdamW beta1", minimum=0.0),
        "beta2": Option(float, 0.999, "AdamW beta2", minimum=0.0),
        "eps": Option(float, 1e-8, "AdamW epsilon", minimum=0.0),
        "impl": IMPL_OPTION,
        "target_modules": TARGETS_OPTION,
    },
    paper="Jordan et al. 2024 (kellerjordan.github.io/posts/muon); arXiv 2502.16982",
    estimate=EstimateTerms(state_bytes=state_bytes, layout=layout, whole_update_temporaries=whole_update),
    incompatible=lambda strategy, opts: (
        "Muon orthogonalises each whole matrix, but FSDP2 hands the optimizer row shards; use strategy ddp"
        if strategy == "fsdp2" else None),
)
