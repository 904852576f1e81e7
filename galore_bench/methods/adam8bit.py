"""8-bit Adam (bitsandbytes), the GaLore paper's memory baseline; optionally stepped layer-wise."""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from galore_bench.methods.adamw import ADAM_OPTIONS, layerwise_or_plain, trainable
from galore_bench.methods.base import MethodDef, Trainer, TrainSettings


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    import bitsandbytes as bnb

    hyper = dict(lr=opts["lr"], weight_decay=opts["weight_decay"], betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"])

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        with unset_fake_temporarily():  # bitsandbytes builds real quantization maps in its constructor
            return bnb.optim.AdamW8bit(groups, **hyper)

    info = {"optimizer": "bitsandbytes.optim.AdamW8bit", "min_8bit_size": 4096}
    return layerwise_or_plain(model, [{"params": trainable(model)}], make, opts, info)


METHOD = MethodDef(
    name="adam8bit",
    summary="8-bit AdamW (bitsandbytes blockwise states)",
    build=build,
    options=ADAM_OPTIONS,
    paper="arXiv 2110.02861; baseline in arXiv 2403.03507",
)
