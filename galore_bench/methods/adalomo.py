"""AdaLomo (arXiv 2310.10195): LOMO's fused in-backward update with factored second moments and grouped
update normalisation; one gradient alive, O(m + n) fp32 state per matrix."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.lomo import METHOD as LOMO_METHOD
from galore_bench.methods.lomo import LomoTrainer
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks
from galore_bench.optim.adalomo import AdaLomo


class AdaLomoTrainer(LomoTrainer):
    """LOMO's trainer (the update is inside backward, LOMO's schedule), with AdaLomo's factored state to count."""

    def state_tensors(self) -> Iterator[torch.Tensor]:
        return self.optimizer.state_tensors()


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    optimizer = AdaLomo(model, lr=opts["lr"], eps=(opts["eps_squared"], opts["eps_scale"]),
                        clip_threshold=opts["clip_threshold"], decay_rate=-opts["decay_exponent"],
                        clip_grad_norm=opts["clip_grad_norm"] or None, clip_grad_value=opts["clip_grad_value"] or None,
                        loss_scale=opts["loss_scale"] or None, weight_decay=opts["weight_decay"])
    return AdaLomoTrainer(model, optimizer,
                          info={"optimizer": "galore_bench.optim.adalomo.AdaLomo",
                                "backward_passes": 2 if opts["clip_grad_norm"] else 1})


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """fp32 row and column vectors of a matrix, a full fp32 vector for a 1-D weight."""
    return blocks(p.shape[0] * 4) + blocks(p.shape[1] * 4) if len(p.shape) == 2 else blocks(p.numel * 4)


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """At the update's peak: one full fp32 tensor (the squared gradient, later the update) and, below fp32
    training, the gradient's fp32 copy beside it; a matrix's row and column factors (fp32) as the update is
    formed, a vector's two 0-dim RMS scalars."""
    full = (2 if e < 4 else 1) * blocks(p.numel * 4)
    if len(p.shape) == 2:
        return full + blocks(p.shape[0] * 4) + blocks(p.shape[1] * 4)
    return full + 2 * blocks(4)


METHOD = MethodDef(
    name="adalomo",
    summary="AdaLomo: fused-backward update, factored second moments, grouped update normalisation",
    build=build,
    options={
        **LOMO_METHOD.options,
        "clip_threshold": Option(float, 1.0, "cap on each weight's update RMS (grouped update normalisation)",
                                 minimum=1e-12),
        "decay_exponent": Option(float, 0.8, "second-moment decay c: beta2_t = 1 - t^-c (lomo-optim's "
                                 "decay_rate is -c)", minimum=0.0),
        "eps_squared": Option(float, 1e-30, "added to the squared gradient before averaging", minimum=0.0),
        "eps_scale": Option(float, 1e-3, "floor of the weight RMS that scales the learning rate", minimum=0.0),
    },
    supports_grad_accum=False,
    paper="arXiv 2310.10195",
    estimate=EstimateTerms(state_bytes=state_bytes, update_temporaries=update_temporaries,
                           updates_in_backward=lambda opts: True),
    incompatible=LOMO_METHOD.incompatible,
)
