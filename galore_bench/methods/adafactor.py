"""Adafactor (transformers), a baseline of the GaLore paper's Figure 4 and Table 11; optionally stepped layer-wise.

Configured as the GaLore repository's pre-training script does: an external learning rate (no relative step, no
parameter scaling), eps (1e-30, 1e-3), clip threshold 1, decay rate -0.8, and beta1 0 meaning *no* first moment.
Its state is then a factored second moment (one fp32 row and one fp32 column vector per matrix). Each parameter's
update allocates fp32 temporaries: the squared gradient and the update (two full-size tensors at a time), plus fp32
copies of the gradient and the weight when training in BF16/FP16.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import LAYERWISE_OPTION, layerwise_or_plain, trainable
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    from transformers.optimization import Adafactor

    beta1 = opts["beta1"] or None  # the GaLore script's convention: 0 keeps no first moment
    hyper = {"lr": opts["lr"], "eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": beta1,
             "weight_decay": opts["weight_decay"], "relative_step": False, "scale_parameter": False,
             "warmup_init": False}

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return Adafactor(groups, **hyper)

    info = {"optimizer": "transformers.optimization.Adafactor", "first_moment": beta1 is not None}
    return layerwise_or_plain(model, [{"params": trainable(model)}], make, opts, info)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """fp32 row and column second-moment vectors of a matrix (a full fp32 one for a vector), an fp32 first moment
    when beta1 > 0, and the fp32 RMS scalar transformers' Adafactor keeps per parameter."""
    second = blocks(p.shape[0] * 4) + blocks(p.shape[1] * 4) if len(p.shape) == 2 else blocks(p.numel * 4)
    return second + (blocks(p.numel * 4) if opts.get("beta1") else 0) + blocks(4)


def update_temporaries(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """grad**2 and (grad**2 + eps), later the update and its negation, all fp32; below fp32 training, also fp32
    copies of the gradient and the weight."""
    return (4 if e < 4 else 2) * blocks(p.numel * 4)


METHOD = MethodDef(
    name="adafactor",
    summary="Adafactor (transformers): factored second moment, no first moment by default",
    build=build,
    options={
        "beta1": Option(float, 0.0, "first-moment decay; 0 keeps no first moment (the GaLore scripts' default), "
                        "> 0 adds an fp32 first moment per parameter", minimum=0.0),
        "layerwise": LAYERWISE_OPTION,
    },
    paper="arXiv 1804.04235; baseline in arXiv 2403.03507 (Fig. 4, Table 11)",
    estimate=EstimateTerms(state_bytes=state_bytes, update_temporaries=update_temporaries),
)
