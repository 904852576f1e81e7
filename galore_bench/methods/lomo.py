"""LOMO (arXiv 2306.09782): SGD fused into backward, at most one gradient alive."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.methods.base import FUSED_WITH_DDP, MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks
from galore_bench.optim.lomo import LOMO, DynamicLossScaler


class LomoTrainer(Trainer):
    """The update happens inside backward; after it only the schedule, if any, moves on (the engines' schedule
    moves LOMO's one parameter group, as it moves any optimizer's)."""

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.step(loss)

    def update(self, step: int) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def state_tensors(self) -> Iterator[torch.Tensor]:
        return iter(())


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    scale: float | DynamicLossScaler | None = opts["loss_scale"] or None
    clip = opts["clip_grad_norm"] or None
    if opts["dynamic_loss_scale"]:  # as the paper runs fp16: the norm pass doubles as the overflow check
        scale, clip = DynamicLossScaler(), clip or 1.0
    lomo = LOMO(model, lr=opts["lr"], clip_grad_norm=clip, clip_grad_value=opts["clip_grad_value"] or None,
                loss_scale=scale, weight_decay=opts["weight_decay"])
    return LomoTrainer(model, lomo, info={"optimizer": "galore_bench.optim.lomo.LOMO",
                                          "backward_passes": 2 if clip else 1,
                                          "loss_scale": "dynamic" if opts["dynamic_loss_scale"] else scale})


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """Below fp32 training, fp32 copies of the gradient and the weight; LOMO keeps no state."""
    return 2 * blocks(p.numel * 4) if e < 4 else 0


def incompatible(strategy: str, opts: dict[str, Any]) -> str | None:
    if strategy == "ddp":
        return "LOMO " + FUSED_WITH_DDP
    if strategy == "fsdp2" and (opts.get("clip_grad_norm") or opts.get("dynamic_loss_scale")):
        return ("LOMO's norm pass would sum only each rank's own gradient shards (a global norm needs an "
                "all-reduce LOMO does not do); set clip_grad_norm = 0 or use clip_grad_value")
    return None


METHOD = MethodDef(
    name="lomo",
    summary="LOMO: fused-backward SGD, one live gradient",
    build=build,
    options={
        "clip_grad_norm": Option(float, 0.0, "max global gradient norm, 0 = off (on costs a 2nd backward)",
                                 minimum=0.0),
        "clip_grad_value": Option(float, 0.0, "clip each gradient element to +-value, 0 = off", minimum=0.0),
        "loss_scale": Option(float, 0.0, "static fp16 loss scale, 0 = off", minimum=0.0),
        "dynamic_loss_scale": Option(bool, False, "fp16 as the LOMO paper runs it: a loss scale from 2^16, halved on "
                                     "overflow, found by the gradient-norm pass before the update (clip_grad_norm "
                                     "1.0 unless set, as lomo-optim does)"),
    },
    supports_grad_accum=False,
    paper="arXiv 2306.09782",
    estimate=EstimateTerms(update_temporaries=update_temporaries, updates_in_backward=lambda opts: True),
    incompatible=incompatible,
)
