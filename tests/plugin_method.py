"""A method defined in one file outside the package: heavy-ball momentum SGD, with its own optimizer.

It reaches the registry through GALORE_BENCH_METHODS=<this file> and nothing else in the package names it
(tests/test_method_plugin.py runs it through estimate, simulate, measure and report). `sketch` is the same
method without estimate terms, to show what `estimate` does with such a method.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods import EstimateTerms, MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.terms import ParamShape, blocks


class HeavyBall(torch.optim.Optimizer):
    """v = momentum * v + g, then w -= lr * v, all in place: one velocity per parameter, in its dtype."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(param)
                velocity = state["velocity"]
                velocity.mul_(group["momentum"]).add_(param.grad)
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(velocity, alpha=-group["lr"])


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = HeavyBall(params, lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"])
    return Trainer(model, optimizer, info={"optimizer": "tests.plugin_method.HeavyBall"})


def velocity_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """One velocity per trainable parameter; the update is in place (no temporaries)."""
    return blocks(p.numel * e)


OPTIONS = {"momentum": Option(float, 0.9, "heavy-ball momentum", minimum=0.0)}

METHODS = (
    MethodDef(name="heavyball", summary="heavy-ball momentum SGD (a test plugin)", build=build, options=OPTIONS,
              estimate=EstimateTerms(state_bytes=velocity_bytes),
              incompatible=lambda strategy, opts: "a test plugin runs on one device" if strategy == "fsdp2" else None),
    MethodDef(name="sketch", summary="heavy-ball without estimate terms (a test plugin)", build=build,
              options=OPTIONS, no_estimate_reason="a sketch: its bytes are not written down yet"),
)
