"""What several adapters share: trainable parameters, torch's implementation switches, layer-wise stepping,
Adam's options and AdamW's update temporaries."""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.methods.base import Option, Trainer
from galore_bench.methods.terms import TORCH_STEP, ParamShape, adam_state, blocks
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
                       info: dict[str, Any], trainer: type[Trainer] = Trainer) -> Trainer:
    """One optimizer over all groups, or one per parameter stepped inside backward (layer-wise)."""
    if opts.get("layerwise"):
        info["layerwise"] = True
        return trainer(model, LayerwiseOptimizer(groups, make), info=info)
    return trainer(model, make(groups), info=info)


TARGETS_OPTION = Option(list, [], "module-name suffixes of the projections to act on, e.g. [\"q_proj\", \"v_proj\"] "
                        "(default: every 2-D projection of attention and MLP in the decoder layers)")

IMPL_OPTION = Option(str, "auto", "torch AdamW implementation (auto: foreach on a GPU and in simulate, "
                     "the for-loop on a CPU)", choices=("auto", "for-loop", "foreach", "fused"))

LAYERWISE_OPTION = Option(bool, False, "update each weight inside backward and free its gradient at once")

ADAM_OPTIONS = {
    "beta1": Option(float, 0.9, "Adam beta1", minimum=0.0),
    "beta2": Option(float, 0.999, "Adam beta2", minimum=0.0),
    "eps": Option(float, 1e-8, "Adam epsilon", minimum=0.0),
    "layerwise": LAYERWISE_OPTION,
}


def adamw_impl(opts: dict[str, Any], target: str, layerwise: bool) -> str:
    """torch AdamW's implementation as the run resolves it: 'auto' is foreach on a GPU, the for-loop on a CPU."""
    impl = opts.get("impl", "auto")
    if layerwise:
        return "for-loop"
    return ("foreach" if target == "gpu" else "for-loop") if impl == "auto" else impl


def adamw_state(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """torch AdamW: two moments in the training dtype and an fp32 `step` tensor per parameter."""
    return adam_state(p.numel, e) + TORCH_STEP


def adamw_update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """The for-loop AdamW: sqrt(v), then (sqrt(v) + eps) or m / denom, two full-size tensors."""
    return 2 * blocks(p.numel * e)


def adamw_whole_update(trainable: list[ParamShape], opts: dict[str, Any], e: int, layerwise: bool,
                       target: str) -> int | None:
    """foreach AdamW holds sqrt(v) of every parameter at once; fused materialises nothing; the for-loop: None."""
    impl = adamw_impl(opts, target, layerwise)
    if impl == "foreach":
        return sum(blocks(p.numel * p.width(e)) for p in trainable)
    if impl == "fused":
        return 0
    return None
