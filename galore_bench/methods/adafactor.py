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

from galore_bench.methods.adamw import layerwise_or_plain, trainable
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings


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


METHOD = MethodDef(
    name="adafactor",
    summary="Adafactor (transformers): factored second moment, no first moment by default",
    build=build,
    options={
        "beta1": Option(float, 0.0, "first-moment decay; 0 keeps no first moment (the GaLore scripts' default), "
                        "> 0 adds an fp32 first moment per parameter", minimum=0.0),
        "layerwise": Option(bool, False, "update each weight inside backward and free its gradient at once"),
    },
    paper="arXiv 1804.04235; baseline in arXiv 2403.03507 (Fig. 4, Table 11)",
)
