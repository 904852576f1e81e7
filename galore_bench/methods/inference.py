"""Inference: the same forward pass with autograd off, no backward, no update.

Not a training method: the memory floor the training methods are measured against. The LOMO paper's claim is
memory "close to inference"; a run of this beside LOMO in one scenario says how close, on the same model, batch
and engine.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Trainer, TrainSettings
from galore_bench.methods.terms import EstimateTerms


class ForwardOnly(Trainer):
    """A Trainer whose step is the forward alone: the engines run it under torch.no_grad (`grad_enabled`)."""

    grad_enabled = False

    def backward(self, loss: torch.Tensor) -> None:
        """Nothing: no graph was recorded."""

    def update(self, step: int) -> None:
        """Nothing: the weights never change."""


def freeze(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    """No parameter trains: records count 0 trainable, and sharding plans see no gradient to bucket or scatter."""
    return model.requires_grad_(False)


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    return ForwardOnly(model, optimizer=None, info={"optimizer": None, "autograd": "off (torch.no_grad)"})


METHOD = MethodDef(
    name="inference",
    summary="forward only, autograd off: the memory floor (LOMO's 'close to inference')",
    build=build,
    prepare=freeze,
    trains=False,
    paper="the reference point of arXiv 2306.09782 (memory close to inference)",
    estimate=EstimateTerms(forward_only=True),
    incompatible=lambda strategy, opts: (
        "DDP needs parameters that require gradients, and inference has none; use strategy fsdp2 "
        "(parameters sharded, gathered per unit) or no [distributed] table" if strategy == "ddp" else None),
)
