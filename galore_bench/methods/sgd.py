"""Plain SGD (torch.optim): the LOMO paper's stateful-free baseline (momentum 0 keeps no state)."""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import impl_flags, trainable
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    params = trainable(model)
    flags = {k: v for k, v in impl_flags("auto", params).items() if k == "foreach"}
    optimizer = torch.optim.SGD(params, lr=opts["lr"], momentum=opts["momentum"],
                                weight_decay=opts["weight_decay"], **flags)
    return Trainer(model, optimizer, info={"optimizer": "torch.optim.SGD",
                                           "impl": "foreach" if flags["foreach"] else "for-loop"})


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """The momentum buffer, when there is momentum; SGD updates in place (no temporaries)."""
    return blocks(p.numel * e) if opts.get("momentum") else 0


METHOD = MethodDef(
    name="sgd",
    summary="SGD (torch.optim), no momentum by default",
    build=build,
    options={"momentum": Option(float, 0.0, "momentum (> 0 adds one state tensor per parameter)", minimum=0.0)},
    paper="baseline in arXiv 2306.09782",
    estimate=EstimateTerms(state_bytes=state_bytes),
)
