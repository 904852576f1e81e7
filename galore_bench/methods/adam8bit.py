"""8-bit Adam (bitsandbytes), the GaLore paper's memory baseline; optionally stepped layer-wise."""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from galore_bench.methods.base import MethodDef, Trainer, TrainSettings
from galore_bench.methods.common import ADAM_OPTIONS, layerwise_or_plain, trainable
from galore_bench.methods.terms import BNB_QUANTIZATION_MAPS, EstimateTerms, ParamShape, adam8bit_state
from galore_bench.optim.galore import MIN_8BIT_SIZE


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    import bitsandbytes as bnb

    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        with unset_fake_temporarily():  # bitsandbytes computes its quantization maps on real tensors
            optimizer = bnb.optim.AdamW8bit(groups, **hyper)
            optimizer.fill_qmap()
        first = groups[0]["params"][0]
        if isinstance(first, FakeTensor):  # its kernels' fake implementations then need the maps as fake tensors too
            optimizer.name2qmap = {k: first.fake_mode.from_tensor(v) for k, v in optimizer.name2qmap.items()}
        return optimizer

    info = {"optimizer": "bitsandbytes.optim.AdamW8bit", "min_8bit_size": MIN_8BIT_SIZE}
    return layerwise_or_plain(model, [{"params": trainable(model)}], make, opts, info)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """Blockwise 8-bit moments (bitsandbytes' kernels update in place: no temporaries). Layer-wise, each
    parameter has its own optimizer, which moves its own pair of quantization maps to the device at its first
    8-bit step (a parameter below MIN_8BIT_SIZE keeps fp32 states and never does)."""
    own_maps = opts.get("layerwise") and p.numel >= MIN_8BIT_SIZE
    return adam8bit_state(p.numel) + (BNB_QUANTIZATION_MAPS if own_maps else 0)


def quantization_maps(opts: dict[str, Any]) -> int:
    """The one pair of bitsandbytes maps all parameters share (layer-wise: none shared, see `state_bytes`)."""
    return 0 if opts.get("layerwise") else BNB_QUANTIZATION_MAPS


METHOD = MethodDef(
    name="adam8bit",
    summary="8-bit AdamW (bitsandbytes blockwise states)",
    build=build,
    options=ADAM_OPTIONS,
    paper="arXiv 2110.02861; baseline in arXiv 2403.03507",
    estimate=EstimateTerms(state_bytes=state_bytes, shared_state_bytes=quantization_maps),
    incompatible=lambda strategy, opts: (
        "bitsandbytes' 8-bit kernels take plain tensors, not FSDP2's DTensor shards; use strategy ddp"
        if strategy == "fsdp2" else None),
)
